"""The measured prefill cost model (model/prefill_cost.py, `qwen25 info --context`): rates fitted to runs made from
known rates come back, predictions follow, and the CLI reads a measurement file (and the project's shipped one)."""

from __future__ import annotations

import json

import pytest

from qwen25.cli import main
from qwen25.config import ModelConfig
from qwen25.model import prefill_cost as pc

RATES = {"matmul": 1.2e11, "attention": 6e10, "sparse": 2.5e10}
BASE = 0.4 * 2**30


def synthetic(lengths=(4096, 8192, 16384, 32768), sparse_lengths=(32768, 131072)) -> dict:
    data = {"machine": "test CPU (2 cores)", "date": "2026-12-07", "preset": "0.5b", "dtype": "fp32", "threads": 2,
            "prefill_chunk": 4096, "kv_int8": False, "sparse": {"min_length": 8192, "max_keys": 2048}, "runs": []}
    cfg = ModelConfig.from_preset("0.5b")
    w, f = pc.matmul_flops_per_token(cfg), pc.flops_per_pair(cfg)
    for mode, lens in (("dense", lengths), ("sparse", sparse_lengths)):
        for n in lens:
            pairs = pc.dense_pairs(n) if mode == "dense" else pc.sparse_pairs(n, 4096, 8192, 2048)
            seconds = n * w / RATES["matmul"] + pairs * f / RATES[mode.replace("dense", "attention")]
            peak = pc.peak_memory(cfg, n, data, mode, BASE)
            data["runs"].append({"length": n, "mode": mode, "ttft_s": seconds, "peak_rss_gib": peak / 2**30})
    return data


def test_fit_recovers_the_rates_and_predicts():
    data = synthetic()
    rates = pc.fit_rates(data)
    for key, value in RATES.items():
        assert rates[key] == pytest.approx(value, rel=1e-6)
    assert rates["base_bytes"] == pytest.approx(BASE, rel=1e-6)
    cfg = ModelConfig.from_preset("7b")
    pred = pc.predict(cfg, 65536, data, rates)
    w, f = pc.matmul_flops_per_token(cfg), pc.flops_per_pair(cfg)
    assert pred["dense"]["seconds"] == pytest.approx(65536 * w / 1.2e11 + pc.dense_pairs(65536) * f / 6e10)
    assert pred["sparse"]["seconds"] < pred["dense"]["seconds"]
    assert pred["dense"]["peak_bytes"] > pc.param_count(cfg) * 4 + 65536 * pc.kv_cache_bytes_per_token(cfg, "fp32")


def test_sparse_pairs():
    assert pc.sparse_pairs(5000, 1024, 8192, 2048) == pc.dense_pairs(5000)  # never reaches min_length: dense
    # every query of the sparse chunks sees max_keys keys (or all it has), plus the probe's rows against every key
    want = pc.dense_pairs(2048) + (4096 - 2048) * 2048 + 64 * 4096
    assert pc.sparse_pairs(4096, 4096, 1, 2048) == want


def test_info_reads_the_measurements(tmp_path, capsys):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(synthetic()))
    assert main(["info", "--preset", "0.5b", "--context", "131072", "--measured", str(path), "--flops", "1e11"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "prefill, measured" in x)
    assert "dense" in line and "sparse" in line and "test CPU" in line
    path.write_text(json.dumps({**synthetic(), "runs": synthetic()["runs"][:1]}))
    main(["info", "--preset", "0.5b", "--context", "1024", "--measured", str(path), "--flops", "1e11"])
    assert "no prediction: the measurements need dense prefills at two lengths" in capsys.readouterr().out


def test_the_shipped_measurements_predict():
    data, path = pc.load_runs(pc.SHIPPED)
    pred = pc.predict(ModelConfig.from_preset("0.5b"), 131072, data, pc.fit_rates(data))
    assert 0 < pred["sparse"]["seconds"] < pred["dense"]["seconds"]
