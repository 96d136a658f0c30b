"""End-to-end recipes built from the stages (data, pre-training, post-training, evaluation, serving)."""
