"""Scaling laws: power-law fits recover known exponents; a tiny real sweep runs end to end; `lr: auto` uses the fit."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import yaml

from qwen25.cli import main
from qwen25.config import ModelConfig, param_count
from qwen25.train.loop import TrainConfig, resolve_config
from qwen25.train.scaling import fit_power_law, fit_scaling, grid_optimum, predict
from test_train_data import make_shards

NS, DS = [4e7, 1.5e8, 6e8, 2e9, 8e9], [1e9, 1e10, 1e11, 1e12]


def test_power_law_fit_recovers_exponents_exactly_without_noise():
    n, d = map(np.ravel, np.meshgrid(NS, DS))
    y = 0.27 * n ** -0.31 * d ** 0.085
    fit = fit_power_law(n, d, y)
    assert fit["alpha"] == pytest.approx(-0.31, abs=1e-10) and fit["beta"] == pytest.approx(0.085, abs=1e-10)
    assert fit["coef"] == pytest.approx(0.27, rel=1e-8) and fit["rmse_log"] < 1e-10
    assert predict(fit, 3e8, 5e10) == pytest.approx(0.27 * 3e8 ** -0.31 * 5e10 ** 0.085, rel=1e-9)


def test_power_law_fit_with_noise_stays_within_tolerance():
    rng = np.random.default_rng(0)
    n, d = map(np.ravel, np.meshgrid(NS, DS))
    n, d = np.tile(n, 3), np.tile(d, 3)  # 60 points
    y = 0.27 * n ** -0.31 * d ** 0.085 * np.exp(rng.normal(0, 0.1, n.size))  # 10% log-normal noise
    fit = fit_power_law(n, d, y)
    # least-squares standard error of the exponents here is ~0.01: a 0.04 tolerance is 4 sigma
    assert abs(fit["alpha"] + 0.31) < 0.04 and abs(fit["beta"] - 0.085) < 0.04
    with pytest.raises(ValueError, match="vary in both N and D"):
        fit_power_law([1e8, 1e8, 1e8], [1e9, 1e10, 1e11], [1.0, 2.0, 3.0])


def test_grid_optimum_and_fit_from_a_known_loss_surface():
    assert grid_optimum([1e-3, 3e-3, 1e-2], [(math.log(v) - math.log(2e-3)) ** 2 for v in (1e-3, 3e-3, 1e-2)]) \
        == pytest.approx(2e-3, rel=1e-9)
    assert grid_optimum([1e-3, 3e-3, 1e-2], [3.0, 2.0, 1.0]) == 1e-2  # at the edge: the grid point
    # loss(N, D, lr, B) quadratic in log lr and log B around known power laws: the sweep pipeline recovers them
    mu = lambda n, d: 0.3 * n ** -0.25 * d ** 0.05  # noqa: E731
    bopt = lambda n, d: 0.05 * n ** 0.1 * d ** 0.35  # noqa: E731
    results = []
    for n, d in itertools.product(NS[:3], DS[:3]):
        centre_lr, centre_b = mu(n, d), bopt(n, d)
        for i, j in itertools.product((-1, 0, 1), (-1, 0, 1)):
            lr, b = centre_lr * 2.0 ** (i + 0.3), centre_b * 2.0 ** (j - 0.2)
            loss = 1 + (math.log(lr / centre_lr)) ** 2 + 0.5 * (math.log(b / centre_b)) ** 2
            results.append({"N": n, "D": d, "lr": lr, "batch_tokens": b, "loss": loss})
    fit = fit_scaling(results)
    assert fit["lr"]["alpha"] == pytest.approx(-0.25, abs=1e-9) and fit["lr"]["beta"] == pytest.approx(0.05, abs=1e-9)
    assert fit["batch_tokens"]["alpha"] == pytest.approx(0.1, abs=1e-9)
    assert fit["batch_tokens"]["beta"] == pytest.approx(0.35, abs=1e-9)


def test_tiny_sweep_end_to_end_and_lr_auto_uses_the_fit(tmp_path):
    data = make_shards(tmp_path / "s", rows=32, seq_len=16)
    sweep = {
        "out_dir": str(tmp_path / "sweep"),
        "base": {"data": str(data), "seq_len": 16, "dtype": "fp32", "warmup": 1, "save_every": 1000,
                 "peak_flops": 1e11},
        "grid": {"models": [{"name": "h32", "preset": "tiny", "hidden_size": 32, "intermediate_size": 88},
                            {"name": "h64", "preset": "tiny"}],
                 "tokens": [256, 512], "lr": [3e-3, 1e-2, 3e-2], "batch_size": [4, 8]},
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--quiet"]) == 0
    results = [json.loads(x) for x in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    assert len(results) == 24 and all(math.isfinite(r["loss"]) for r in results)
    assert {r["D"] for r in results} == {256, 512} and len({r["N"] for r in results}) == 2
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--quiet"]) == 0  # finished runs are not redone
    assert len((tmp_path / "sweep" / "results.jsonl").read_text().splitlines()) == 24

    assert main(["fit-scaling", str(tmp_path / "sweep")]) == 0
    fit = json.loads((tmp_path / "sweep" / "fit.json").read_text())
    assert (tmp_path / "sweep" / "fit.png").stat().st_size > 1000
    cfg = resolve_config(TrainConfig(out_dir=str(tmp_path / "auto"), model="tiny", lr="auto", batch_size="auto",
                                     tokens=768, seq_len=16, scaling_fit=str(tmp_path / "sweep" / "fit.json")))
    n = param_count(ModelConfig.from_preset("tiny"), embeddings=False)
    optima = [p["lr_opt"] for p in fit["points"]]
    assert cfg.lr == pytest.approx(min(max(predict(fit["lr"], n, 768), min(optima)), max(optima)), rel=1e-12)
    assert cfg.batch_size == max(1, round(predict(fit["batch_tokens"], n, 768) / 16))
    assert cfg.steps == max(1, round(768 / (cfg.batch_size * 16)))
    with pytest.raises(ValueError, match="no scaling_fit"):
        resolve_config(TrainConfig(out_dir="x", lr="auto"))
    with pytest.warns(UserWarning, match=r"extrapolated: D = 51,200 is 100.0x the largest swept"):
        resolve_config(TrainConfig(out_dir=str(tmp_path / "far"), model="tiny", lr="auto", batch_size=4,
                                   tokens=51_200, seq_len=16, scaling_fit=str(tmp_path / "sweep" / "fit.json")))


def test_auto_lr_stays_inside_the_measured_optima(tmp_path):
    """A law that extrapolates to a rate below every measured optimum is clamped to the nearest one, with a
    warning; inside the range the prediction is used as it is."""
    n = param_count(ModelConfig.from_preset("tiny"), embeddings=False)
    points = [{"N": n, "D": d, "lr_opt": lr, "batch_tokens_opt": 64.0, "best_loss": 1.0}
              for d, lr in ((1000, 1e-2), (2000, 3e-3))]
    fit = {"lr": {"coef": 1.0, "alpha": 0.0, "beta": -1.0, "rmse_log": 0.0}, "points": points,
           "batch_tokens": {"coef": 64.0, "alpha": 0.0, "beta": 0.0, "rmse_log": 0.0}}
    (tmp_path / "fit.json").write_text(json.dumps(fit))

    def resolved(tokens):
        return resolve_config(TrainConfig(out_dir=str(tmp_path / "r"), model="tiny", lr="auto", batch_size=4,
                                          tokens=tokens, seq_len=16, scaling_fit=str(tmp_path / "fit.json"))).lr

    assert resolved(256) == pytest.approx(1 / 256)  # 1/D = 3.9e-3: inside
    with pytest.warns(UserWarning, match=r"lr 0.000977 lies outside the measured optima \[0.003, 0.01\]"):
        assert resolved(1024) == pytest.approx(3e-3)
