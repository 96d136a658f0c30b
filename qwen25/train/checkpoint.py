"""Training checkpoints: atomic, keep-last-N, exact resume, and no pickles.

A run directory holds `step-00000100/` folders and a `latest` file naming the newest complete one. Each
step folder has:
    model.safetensors      the model weights (HF tensor names)
    optimizer.safetensors  every optimizer state tensor, named "<param name>/<state key>"
    rng.safetensors        torch CPU (and CUDA) generator states
    state.json             step, optimizer hyper-parameters and scalar state, data position, user extras
A step folder is written under a temporary name and renamed when complete, then `latest` is replaced
atomically, so a crash mid-save never touches the last good checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"step-{step:08d}"


def optimizer_to_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]):
    """(tensors, meta): the optimizer state as named tensors plus JSON-able scalars and hyper-parameters."""
    tensors, scalars = {}, {}
    for param, state in optimizer.state.items():
        name = names[param]
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [names[p] for p in g["params"]]}
              for g in optimizer.param_groups]
    return tensors, {"scalars": scalars, "param_groups": groups}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter],
                           tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore what optimizer_to_tensors saved into an optimizer over the same named parameters."""
    if len(meta["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint has {len(meta['param_groups'])} parameter groups, "
                         f"the optimizer {len(optimizer.param_groups)}")
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        if [params[n] for n in saved["params"]] != list(group["params"]):
            raise ValueError("the optimizer's parameters differ from the checkpoint's")
        group.update({k: v for k, v in saved.items() if k != "params"})
    optimizer.state.clear()
    for key, value in tensors.items():
        name, _, slot = key.rpartition("/")
        param = params[name]
        optimizer.state[param][slot] = value.to(param.device)
    for key, value in meta["scalars"].items():
        name, _, slot = key.rpartition("/")
        optimizer.state[params[name]][slot] = value


def save_training_state(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        data_state: dict | None = None, extra: dict | None = None, keep_last: int = 3) -> Path:
    """Write a complete checkpoint for `step` atomically; keep only the newest `keep_last` ones."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = _step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    names = {p: n for n, p in model.named_parameters()}
    weights = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items()}
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)  # shared with the embedding; safetensors refuses aliases
    save_file(weights, tmp / "model.safetensors")
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer, names)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, tmp / "rng.safetensors")
    py_state = random.getstate()
    state = {"step": step, "optimizer": opt_meta, "data": data_state or {}, "extra": extra or {},
             "python_random": [py_state[0], list(py_state[1]), py_state[2]]}
    (tmp / "state.json").write_text(json.dumps(state))
    return publish_checkpoint(run_dir, tmp, final, keep_last)


def publish_checkpoint(run_dir: Path, tmp: Path, final: Path, keep_last: int) -> Path:
    """Make a fully written `tmp` folder the checkpoint `final` (one rename), point LATEST at it (another), then
    drop the oldest step folders before it, keeping keep_last in all: a crash at any point leaves the last good
    checkpoint. Folders of later steps (a run resumed from an older checkpoint) are left alone."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = run_dir / (LATEST + ".tmp")
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, run_dir / LATEST)
    older = sorted(p for p in run_dir.glob("step-*[0-9]") if p.name < final.name)
    for old in older[:max(0, len(older) - (keep_last - 1))] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_problem(path: Path) -> str | None:
    """Why a step folder cannot be resumed from (missing, unreadable state.json, truncated tensors), or None."""
    if not path.is_dir():
        return "missing"
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return "state.json has no step"
    except (OSError, ValueError) as e:
        return f"state.json unreadable ({e.__class__.__name__})"
    if state.get("format") == "dcp":
        return None if (path / ".metadata").is_file() else "no .metadata"
    from safetensors import safe_open

    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        try:
            with safe_open(str(path / name), framework="pt"):
                pass  # the header is read and checked against the file's size: a truncated file fails here
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types and OSError
            return f"{name} unreadable ({e})"
    return None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete step folder of a run directory, or None.

    LATEST names it; when that folder is gone or damaged (a disk that filled up, a copy that was cut short),
    the newest intact step folder is taken instead, with a warning that says which and why.
    """
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    named = None
    if pointer.is_file():
        named = run_dir / pointer.read_text().strip()
        if (problem := checkpoint_problem(named)) is None:
            return named
    candidates = sorted((p for p in run_dir.glob("step-*[0-9]") if p.is_dir()), reverse=True)
    if named is None and not candidates:
        return None
    for path in candidates:
        if path != named and checkpoint_problem(path) is None:
            why = f"{LATEST} names {named.name} ({problem})" if named is not None else f"no {LATEST} file"
            warnings.warn(f"{run_dir}: {why}; resuming from {path.name}, the newest intact checkpoint",
                          stacklevel=2)
            return path
    what = f"{named.name}: {problem}" if named is not None else "none intact"
    raise RuntimeError(f"{run_dir}: no intact checkpoint to resume from ({what}; step folders: "
                       f"{', '.join(p.name for p in candidates) or 'none'}). Move the run directory away to start "
                       f"over.")


def load_training_state(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and RNG from a step folder; returns state.json (step, data, extra)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    weights = load_file(path / "model.safetensors")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", 0))]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    params = dict(model.named_parameters())
    optimizer_from_tensors(optimizer, params, load_file(path / "optimizer.safetensors"), state["optimizer"])
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count())])
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return state
