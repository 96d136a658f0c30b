"""The loss law L(N, D) = E + A/N^alpha + B/D^beta: exact recovery, D_eff vs D on quality data, and a tiny quality
sweep end to end (corpora of known quality, held-out loss per run, both fits, the CLI)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from qwen25.cli import main
from qwen25.train.loss_law import compare_fits, fit_loss_law, predict_loss
from qwen25.train.sweep import corpus_quality, sweep_grid
from test_train_data import make_shards

LAW = dict(E=1.7, A=80.0, alpha=0.35, B=400.0, beta=0.45)


def law(n, d):
    return LAW["E"] + LAW["A"] / n ** LAW["alpha"] + LAW["B"] / d ** LAW["beta"]


def test_fit_recovers_a_known_law_without_noise():
    rng = np.random.default_rng(1)
    n = np.exp(rng.uniform(np.log(1e4), np.log(1e7), 30))
    d = np.exp(rng.uniform(np.log(1e5), np.log(1e9), 30))
    fit = fit_loss_law(n, d, law(n, d))
    assert fit["alpha"] == pytest.approx(LAW["alpha"], rel=2e-3) and fit["beta"] == pytest.approx(LAW["beta"], rel=2e-3)
    assert fit["E"] == pytest.approx(LAW["E"], abs=2e-3) and fit["rmse"] < 1e-3
    assert predict_loss(fit, 3e5, 2e7) == pytest.approx(law(3e5, 2e7), abs=2e-3)
    with pytest.raises(ValueError, match="5 parameters"):
        fit_loss_law([1, 2], [1, 2], [1, 2])


def test_effective_tokens_explain_losses_that_depend_on_quality():
    """When the loss follows q x D, the D_eff fit predicts held-out points far better than the raw-D fit; when
    quality does not matter (every corpus q = 1), the two fits are the same."""
    rng = np.random.default_rng(0)
    points = [{"N": n, "D": d, "quality": q, "heldout_loss": law(n, q * d) + rng.normal(0, 0.005)}
              for n in (2e4, 8e4, 3e5) for d in (1e5, 4e5, 1.6e6) for q in (0.9, 0.5, 0.2)]
    result = compare_fits(points)
    assert result["D_eff"]["loo_rmse"] < 0.02 < result["D"]["loo_rmse"] / 3
    assert result["D_eff"]["extrapolation_rmse"] < result["D"]["extrapolation_rmse"]
    same = compare_fits([dict(p, quality=1.0) for p in points])
    assert same["D"]["rmse"] == pytest.approx(same["D_eff"]["rmse"])


def test_quality_sweep_end_to_end(tmp_path):
    """A sweep with a data axis (two corpora of recorded quality) and held-out shards: each run records its
    quality and held-out loss, finished runs are skipped, and fit-loss-law writes both fits and a plot."""
    corpora = []
    for name, seed, quality in (("clean", 0, 0.9), ("mixed", 1, 0.4)):
        path = make_shards(tmp_path / name, rows=32, seq_len=16, seed=seed)
        index = json.loads((path / "index.json").read_text())
        index.setdefault("meta", {})["quality"] = quality
        (path / "index.json").write_text(json.dumps(index))
        corpora.append({"name": name, "path": str(path)})
    assert corpus_quality(corpora[1]["path"]) == 0.4
    heldout = make_shards(tmp_path / "heldout", rows=8, seq_len=16, seed=0)
    sweep = {"out_dir": str(tmp_path / "sweep"), "eval_data": str(heldout),
             "base": {"seq_len": 16, "dtype": "fp32", "warmup": 1, "save_every": 1000, "peak_flops": 1e11},
             "grid": {"models": [{"name": "h32", "preset": "tiny", "hidden_size": 32, "intermediate_size": 88},
                                 {"name": "h64", "preset": "tiny"}],
                      "tokens": [128, 256, 512], "lr": [1e-2], "batch_size": [4], "data": corpora}}
    assert {r["quality"] for r in sweep_grid(sweep)} == {0.9, 0.4}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--quiet"]) == 0
    results = [json.loads(x) for x in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    assert len(results) == 12 and all(math.isfinite(r["heldout_loss"]) for r in results)
    assert {r["quality"] for r in results} == {0.9, 0.4}
    # more tokens of the clean corpus lower the held-out loss of the same model
    clean = {r["D"]: r["heldout_loss"] for r in results if r["name"].startswith("h64") and r["quality"] == 0.9}
    assert clean[512] < clean[128]
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--quiet"]) == 0  # nothing redone
    assert len((tmp_path / "sweep" / "results.jsonl").read_text().splitlines()) == 12
    assert main(["fit-loss-law", str(tmp_path / "sweep")]) == 0
    law_file = json.loads((tmp_path / "sweep" / "loss_law.json").read_text())
    assert {"D", "D_eff", "points"} <= set(law_file) and len(law_file["points"]) == 12
    for key in ("D", "D_eff"):
        assert math.isfinite(law_file[key]["loo_rmse"]) and law_file[key]["rmse"] <= law_file[key]["loo_rmse"] + 1e-9
    assert (tmp_path / "sweep" / "loss_law.png").stat().st_size > 10_000
