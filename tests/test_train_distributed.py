"""FSDP2 on 2 gloo processes: the same loss curve as one process, and an exact resume from DCP checkpoints."""

from __future__ import annotations

import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from qwen25.train.loop import TrainConfig, train
from test_train_data import make_shards


def _config(out, data, **changes) -> TrainConfig:
    base = dict(out_dir=str(out), data=str(data), model="tiny", steps=6, batch_size=4, seq_len=32, lr=1e-2,
                warmup=2, grad_accum=2, dtype="fp32", save_every=3, peak_flops=1e11)
    return TrainConfig(**{**base, **changes})


def _worker(rank: int, world: int, port: int, data: str, runs: list) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for out, changes in runs:  # several runs in one process group: process start-up is the slow part
            train(_config(out, data, **changes), progress=False)
    finally:
        dist.destroy_process_group()


def _spawn(data, runs) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(data), [(str(o), c) for o, c in runs]), nprocs=2, join=True)


def _curve(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_process_fsdp_equals_one_process_and_resumes_exactly_from_dcp(tmp_path):
    data = make_shards(tmp_path / "s", rows=40)
    single, fsdp, resumed = tmp_path / "single", tmp_path / "fsdp", tmp_path / "resumed"
    torch.set_num_threads(1)
    train(_config(single, data), progress=False)
    # One 2-process job: an uninterrupted run; a run that stops after step 3 (a DCP checkpoint); its restart.
    _spawn(data, [(fsdp, {}), (resumed, {"stop_at": 3}), (tmp_path / "check", {"stop_at": 3}), (resumed, {})])

    # Same global batch (each process takes half of every micro-batch): the same curve up to fp32 reduction
    # order (gradients are reduce-scattered over 2 shards instead of summed in one process).
    a, b = _curve(single), _curve(fsdp)
    assert [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5 * abs(x["loss"]), (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) < 1e-4 * abs(x["grad_norm"]), (x, y)
    assert (fsdp / "step-00000006" / "state.json").is_file() and list((fsdp / "step-00000006").glob("*.distcp"))
    wa, wb = load_file(single / "final" / "model.safetensors"), load_file(fsdp / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4) for k in wa)

    # Stopped after step 3, started again: steps 4-6 and the exported weights are bitwise equal.
    check = tmp_path / "check"
    assert (check / "latest").read_text().strip() == "step-00000003" and not (check / "final").exists()
    assert [m["loss"] for m in _curve(resumed)] == [m["loss"] for m in b]
    wr = load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(wr[k], wb[k]) for k in wb)
