"""HF-layout checkpoints: config.json + safetensors (one file, or shards with model.safetensors.index.json).

Loading builds the model on the meta device and assigns each tensor as it is read from the memory-mapped
file, so no second full copy of the weights exists. Pickle-based formats are never loaded.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import ModelConfig
from .transformer import CausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
# Tensors some older exports carry that have no place in the model (recomputed from the config).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded, with the reason."""


def resolve_dtype(dtype: str | torch.dtype | None, cfg: ModelConfig | None = None,
                  device: str | torch.device = "cpu") -> torch.dtype:
    """'bf16'/'fp32'/torch dtype/'auto' (the config's torch_dtype) -> torch dtype; fp16 is refused on CPU."""
    if dtype is None or dtype == "auto":
        dtype = cfg.torch_dtype if cfg is not None else "float32"
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPE_NAMES:
            raise CheckpointError(f"unknown dtype {dtype!r}; use bf16 or fp32")
        dtype = _DTYPE_NAMES[dtype.removeprefix("torch.")]
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise CheckpointError("fp16 is not supported on CPU (Qwen2.5 activations overflow fp16): use bf16 or fp32")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise CheckpointError(f"unsupported dtype {dtype}; use bf16 or fp32")
    return dtype


def checkpoint_files(directory: str | Path) -> dict[str, Path]:
    """Map every tensor name of a checkpoint directory to the safetensors file that holds it."""
    directory = Path(directory)
    index, single = directory / INDEX_FILE, directory / SINGLE_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from e
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
        files = {name: directory / file for name, file in weight_map.items()}
        for file in sorted(set(weight_map.values())):  # a plain name: no '..', no absolute or nested path
            if Path(file).name != file or file in ("", ".", "..") or "\\" in file:
                raise CheckpointError(f"{index}: shard {file!r} is not a file name of {directory} "
                                      f"(an index names files of its own directory only)")
        for file in sorted(set(files.values())):
            if not file.is_file():
                held = [n for n, f in files.items() if f == file]
                raise CheckpointError(
                    f"missing shard {file.name} (listed in {INDEX_FILE}); it holds {len(held)} tensors, "
                    f"e.g. {', '.join(held[:3])}")
        return files
    if single.is_file():
        return {name: single for name in _open(single).keys()}
    pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
    hint = f" (found {', '.join(pickles)}: pickle files are never loaded; convert them to safetensors)" \
        if pickles else ""
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors file, truncated or corrupt? ({e})") from e


def load_model(directory: str | Path, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device = "cpu", config: ModelConfig | None = None) -> CausalLM:
    """Load an HF-layout checkpoint directory into a CausalLM (eval mode, no gradients required)."""
    cfg = config or ModelConfig.from_json(directory)
    dtype = resolve_dtype(dtype, cfg, device)
    with torch.device("meta"):
        model = CausalLM(cfg)
    load_weights(model, directory, dtype, device)
    return model.eval()


def load_weights(model: CausalLM, directory: str | Path, dtype: torch.dtype, device="cpu") -> None:
    """Assign every tensor of a checkpoint into `model` (which may live on the meta device)."""
    expected = dict(model.named_parameters(remove_duplicate=False))
    tied = model.config.tie_word_embeddings
    files = checkpoint_files(directory)
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    loaded = set()
    for file, names in by_file.items():
        reader = _open(file)
        present = set(reader.keys())
        for name in names:
            if _IGNORED.match(name) or (tied and name == "lm_head.weight"):
                continue
            if name not in expected:
                raise CheckpointError(f"tensor {name} in {file.name} is not part of this model "
                                      f"(model_type {model.config.model_type}); wrong config.json?")
            if name not in present:
                raise CheckpointError(f"tensor {name}: listed for {file.name} but not in that file")
            try:
                info = reader.get_slice(name)
                st_dtype, shape = info.get_dtype(), tuple(info.get_shape())
            except SafetensorError as e:
                raise CheckpointError(f"tensor {name} in {file.name}: unreadable ({e})") from e
            want = tuple(expected[name].shape)
            if shape != want:
                raise CheckpointError(f"tensor {name}: expected shape {want}, {file.name} has {shape}")
            if st_dtype not in _ST_DTYPES:
                raise CheckpointError(f"tensor {name} in {file.name}: unsupported dtype {st_dtype} "
                                      f"(supported: {', '.join(_ST_DTYPES)})")
            try:
                tensor = reader.get_tensor(name)
            except SafetensorError as e:
                raise CheckpointError(f"tensor {name} in {file.name}: cannot read data, "
                                      f"truncated file? ({e})") from e
            _assign(model, name, tensor.to(device=device, dtype=dtype))
            loaded.add(name)
    missing = [n for n in expected if n not in loaded and not (tied and n == "lm_head.weight")]
    if missing:
        hint = " (config has tie_word_embeddings=false)" if missing == ["lm_head.weight"] else ""
        raise CheckpointError(f"checkpoint {directory} lacks {len(missing)} tensor(s){hint}: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    model.tie_weights()
    model.reset_rope()


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"cannot parse shard size {size!r}; use bytes or e.g. '5GB', '500MB'")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def save_model(model: CausalLM, directory: str | Path, max_shard_size: int | str = "5GB",
               dtype: str | torch.dtype | None = None, generation_config: dict | None = None) -> Path:
    """Save in the HF layout: config.json, safetensors (sharded past max_shard_size), generation_config.json.

    A tied lm_head is not written (as in the official checkpoints). Files are written under temporary
    names and renamed, so an interrupted save never leaves a half-written file under a final name.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    first = next(model.parameters())
    dtype = resolve_dtype(dtype, device="cpu") if dtype is not None else first.dtype
    state = {n: p for n, p in model.state_dict().items()
             if not (model.config.tie_word_embeddings and n == "lm_head.weight")}
    limit = _parse_size(max_shard_size)
    shards, current, size = [], [], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * torch.empty((), dtype=dtype).element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    # The old weights stay loadable until the new ones are complete: new files go beside them under names the
    # live layout does not use, and one step makes them live (replacing the index, or model.safetensors / removing
    # the index); only then are the old files removed.
    live = _live_files(directory)
    for stale in set(directory.glob("model*.safetensors")) - {directory / f for f in live}:
        stale.unlink(missing_ok=True)  # left by an interrupted save: nothing refers to them
    names = [SINGLE_FILE]
    if len(shards) > 1:
        for prefix in ("model", "model-next"):
            names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            if not set(names) & live:
                break
    weight_map, total = {}, 0
    for file, shard in zip(names, shards):
        tensors = {n: state[n].detach().to("cpu", dtype).contiguous() for n in shard}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        _atomic(directory / file, lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
        weight_map.update({n: file for n in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _atomic(directory / INDEX_FILE, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2) + "\n"))
    else:
        (directory / INDEX_FILE).unlink(missing_ok=True)  # model.safetensors is complete: it becomes the weights
    for old in live - set(names):
        (directory / old).unlink(missing_ok=True)
    model.config.replace(torch_dtype=str(dtype).removeprefix("torch.")).save(directory)
    if generation_config is not None:
        text = json.dumps(generation_config, indent=2) + "\n"
        _atomic(directory / "generation_config.json", lambda tmp: Path(tmp).write_text(text))
    return directory


def _live_files(directory: Path) -> set[str]:
    """The weight files a load of `directory` reads now (the index's shards, or model.safetensors)."""
    try:
        return {f for f in json.loads((directory / INDEX_FILE).read_text())["weight_map"].values()
                if isinstance(f, str) and Path(f).name == f}
    except FileNotFoundError:
        return {SINGLE_FILE} if (directory / SINGLE_FILE).is_file() else set()
    except (ValueError, KeyError, TypeError, AttributeError):  # an unreadable index: nothing loads now anyway
        return set()


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
