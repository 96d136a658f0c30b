"""Pre-training data: pipeline steps (quality, dedup, domains, decontamination) and token shards (`shards.py`).

Nothing is imported here, so that `qwen25 --help` and `qwen25 data ...`'s argument parsing do not load torch
(the shards need it): import from the modules, e.g. `from qwen25.data.shards import TokenShards`."""
