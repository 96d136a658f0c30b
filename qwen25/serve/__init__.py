"""Serving: the OpenAI-compatible server and the terminal chat, over the generation engine (qwen25.generation)."""
