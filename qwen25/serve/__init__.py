"""Serving: the continuous-batching engine (token ids) and, above it, the OpenAI-compatible server."""

from .engine import Engine, Request, StepOutput

__all__ = ["Engine", "Request", "StepOutput"]
