"""Long-context training as configuration: phases that change sequence length and RoPE base, and the
progressive long/short mix of Qwen2.5-Turbo.

The report pre-trains at 4,096 tokens, then continues at 32,768 with the RoPE base raised from 10,000 to
1,000,000 (ABF). Turbo grows the context in stages (32K -> 64K -> 128K -> 256K, base 10,000,000) and at every
stage trains on 40% sequences at the stage's maximum length and 60% shorter ones. A config with `phases:`
runs each phase as one training run in out_dir/<phase name>/, starting from the previous phase's final
weights under the new rope_theta / seq_len (the optimizer and schedule start afresh):

    out_dir: runs/pretrain
    model: tiny
    lr: 3.0e-3
    phases:
      - {name: short, seq_len: 4096, rope_theta: 10000, steps: 1000, data: shards/4k}
      - {name: long, seq_len: 32768, rope_theta: 1000000, steps: 200, data: shards/32k,
         long_fraction: 0.4, short_lengths: [4096, 16384]}

A finished phase (out_dir/<name>/final exists) is skipped, and an unfinished one resumes from its latest
checkpoint, so the whole sequence restarts where it stopped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .loop import TrainConfig, model_config, train


def phase_configs(raw: dict) -> list[TrainConfig]:
    """One TrainConfig per phase: shared keys, then the phase's keys; phase k > 0 starts from phase k-1's final."""
    common = {k: v for k, v in raw.items() if k != "phases"}
    if "out_dir" not in common:
        raise ValueError("a phased config needs out_dir (each phase writes out_dir/<phase name>/)")
    configs, previous = [], None
    for i, phase in enumerate(raw["phases"]):
        phase = dict(phase)
        name = phase.pop("name", f"phase{i + 1}")
        merged = {**common, **phase, "out_dir": str(Path(common["out_dir"]) / name)}
        overrides = dict(merged.pop("model_overrides", {}) or {})
        if "rope_theta" in merged:
            overrides["rope_theta"] = float(merged.pop("rope_theta"))
        if previous is not None:  # continue from the previous phase's weights and architecture
            final = str(Path(previous.out_dir) / "final")
            merged["model"], merged["init_from"] = final, final
        previous = TrainConfig.from_dict({**merged, "model_overrides": overrides})
        configs.append(previous)
    return configs


def with_room_for_positions(cfg: TrainConfig) -> TrainConfig:
    """Raise max_position_embeddings to the phase's seq_len when the architecture it starts from is shorter."""
    if cfg.seq_len <= model_config(cfg).max_position_embeddings:
        return cfg
    return dataclasses.replace(cfg, model_overrides={**cfg.model_overrides, "max_position_embeddings": cfg.seq_len})


def run_phases(raw: dict, progress: bool = True) -> list[dict]:
    """Train every phase in order (skipping finished ones); returns each phase's final metrics."""
    results = []
    for cfg in phase_configs(raw):
        if (Path(cfg.out_dir) / "final" / "config.json").is_file():
            print(f"phase {Path(cfg.out_dir).name}: already finished, skipped")
            results.append({})
            continue
        cfg = with_room_for_positions(cfg)  # needs the previous phase's final config.json: resolved now
        mcfg = model_config(cfg)
        print(f"phase {Path(cfg.out_dir).name}: seq_len {cfg.seq_len}, rope_theta {mcfg.rope_theta:g}, "
              f"steps {cfg.steps}, from {cfg.init_from or 'random init'}")
        results.append(train(cfg, progress=progress))
        if not (Path(cfg.out_dir) / "final").is_dir():  # stopped early (stop_at): later phases wait
            break
    return results
