"""Evaluation tasks and their harness (passkey retrieval so far)."""
