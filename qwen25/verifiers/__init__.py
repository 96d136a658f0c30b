"""Verifiers shared by evaluation and post-training: math answer checking and sandboxed code execution."""
