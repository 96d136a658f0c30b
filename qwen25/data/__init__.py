"""Pre-training data: pipeline steps (quality, dedup, domains, decontamination) and token shards."""

from .shards import ShardError, ShardWriter, TokenShards

__all__ = ["ShardError", "ShardWriter", "TokenShards"]
