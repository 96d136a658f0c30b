"""Data-parallel training on an existing engine: torchrun + FSDP2 (`fully_shard`) + torch.distributed.checkpoint.

The model stays plain; parallelism is applied from outside (torchtitan style). `init()` reads torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and starts the process group: NCCL on GPUs,
gloo on CPUs. `shard_model` wraps every decoder layer, then the root, with `fully_shard` on a 1-D device mesh,
so parameters, gradients and optimizer state are split across processes. Checkpoints are DCP folders
(each process writes its own shards, any world size can read them back), made atomic as the single-process
ones are: written under a temporary name, renamed by rank 0, then `latest` is replaced.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..model import CausalLM, save_model
from .checkpoint import _step_dir, publish_checkpoint


def is_distributed() -> bool:
    """True inside an initialised process group (torchrun, or a spawned test)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def init(backend: str | None = None) -> tuple[int, int]:
    """Start the process group from torchrun's environment (no-op without WORLD_SIZE); returns (rank, world)."""
    if "WORLD_SIZE" in os.environ and not is_distributed():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend)
    return rank_and_world()


def shutdown() -> None:
    """Leave the process group (end of a torchrun job)."""
    if is_distributed():
        dist.destroy_process_group()


def shard_model(model: torch.nn.Module, mesh=None) -> torch.nn.Module:
    """FSDP2: shard each decoder layer, then the root (embedding, final norm, lm_head), over a 1-D mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def all_sum(value: float, device: torch.device) -> float:
    """Sum of a Python float over all processes (the value itself without a process group)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip gradients to a global L2 norm (over all shards) and return the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor when parameters are sharded
        norm = norm.full_tensor()
    return float(norm)


def _state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, data_state: dict | None = None,
                    keep_last: int = 3) -> Path:
    """Every process writes its shards of model + optimizer to run_dir/step-XXXXXXXX (DCP), atomically."""
    import torch.distributed.checkpoint as dcp

    run_dir = Path(run_dir)
    final = _step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        state = {"step": step, "data": data_state or {}, "world_size": dist.get_world_size(), "format": "dcp"}
        (tmp / "state.json").write_text(json.dumps(state))
        publish_checkpoint(run_dir, tmp, final, keep_last)
    dist.barrier()
    return final


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` allowing only what it holds: DCP's own classes (dataclasses and enums),
    torch.Size, dtypes, layouts and memory formats, paths (the checkpoint id). Any other global (os.system, builtins.eval, ...) is refused,
    so a planted `.metadata` cannot run code the way plain `pickle.load` lets it."""

    def find_class(self, module: str, name: str):
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        if module == "torch.serialization" and name == "_get_layout":  # layouts pickle as this name lookup
            from torch.serialization import _get_layout

            return _get_layout
        if (module, name) in (("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                              ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")):  # inert containers
            import importlib

            return getattr(importlib.import_module(module), name)
        if module.startswith("torch.distributed.checkpoint.") and "." not in name:
            import importlib

            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type):
                return obj
        raise pickle.UnpicklingError(f"DCP metadata names {module}.{name}, which a checkpoint's metadata never "
                                     f"holds: refused (a tampered or foreign .metadata file?)")


def _safe_reader_and_planner(path: Path):
    """A FileSystemReader whose metadata goes through _MetadataUnpickler, and a load planner that reads the
    non-tensor values (optimizer hyper-parameters) with torch.load(weights_only=True): no arbitrary unpickling."""
    import io

    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            try:
                with open(Path(self.path) / ".metadata", "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
                raise ValueError(f"{self.path}/.metadata: {e}") from e
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            value = torch.load(value, weights_only=True)  # plain data only; refuses any other global
            buffer = io.BytesIO()
            torch.save(value, buffer)  # our own bytes of a checked value, handed to DCP's own placement
            buffer.seek(0)
            super().load_bytes(read_item, buffer)

    return Reader(str(path)), Planner()


def load_checkpoint(path: str | Path, model, optimizer) -> dict:
    """Read a DCP step folder into the sharded model and optimizer; returns its state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != "dcp":
        raise ValueError(f"{path}: a single-process checkpoint; resume it without torchrun, or start a new run")
    target = _state(model, optimizer)
    reader, planner = _safe_reader_and_planner(path)
    dcp.load(target, storage_reader=reader, planner=planner)
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"])
    return state


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The unsharded model weights on CPU (gathered on every process; cheap enough at export time)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_full(model, directory: str | Path) -> Path:
    """Gather the weights and write an HF-layout checkpoint from rank 0 (what `load_model` reads)."""

    weights = full_state_dict(model)
    if dist.get_rank() == 0:
        plain = CausalLM(model.config)
        missing, unexpected = plain.load_state_dict(weights, strict=False)
        if [m for m in missing if m != "lm_head.weight"] or unexpected:
            raise ValueError(f"gathered weights do not match the model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        plain.tie_weights()
        save_model(plain, directory)
    dist.barrier()
    return Path(directory)
