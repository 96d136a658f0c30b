"""Evaluation: the harness (qwen25.evals.harness) over tasks (qwen25.tasks), reports, passkey retrieval, and the
lm-evaluation-harness adapter. Verifiers (math, sandboxed code) live in qwen25.verifiers."""
