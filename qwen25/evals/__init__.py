"""Evaluation: tasks (jsonl + spec, qwen25.evals.task), the harness (qwen25.evals.harness), reports, passkey
retrieval, and the lm-evaluation-harness adapter. Verifiers (math, sandboxed code) live in qwen25.verifiers."""
