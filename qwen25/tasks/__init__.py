"""Tasks: a jsonl file + a small spec that makes prompts and checks completions (`task.py`, the built-in specs in
`builtin/`), and the passkey prompts (`passkey.py`). Evaluation (qwen25.evals) and post-training (qwen25.post: the
reward of GRPO and rejection sampling) both take their tasks from here.
"""
