"""Fast CPU kernels for inference (AVX-512, AMX), compiled on first use; torch's kernels otherwise.

A decode step multiplies one activation row per running request by every weight matrix, so it is bound by
memory bandwidth. torch's bf16 `linear` streams the 0.5B model's weights at ~18 GB/s on this project's CPU
and its int8-weight kernel at ~15 GB/s; `cpu_kernels.c` reads them at ~30 GB/s (benchmarks/decode.py).
RMSNorm and RoPE take one pass over the rows of a decode step or a prompt. On CPUs with AMX a mixture-of-experts
block runs its experts in two kernel calls (KernelMoeBlock): a mini-moe forward ~2x transformers', its MoE blocks
2.6-3x, one Qwen1.5-MoE-A2.7B layer 1.6x (benchmarks/moe.py).

An fp32 model's decode steps take `cpu_kernels_avx2.c` on any x86 CPU with AVX2 and FMA (fp32 is the fast dtype
where there is no AVX-512: torch has no quick bf16 matmul there): its few-row products run 1.3-4x faster than
torch's (each weight read once per step; benchmarks/decode.py).

The C sources are compiled with the system C compiler (`cc -O3 -march=native -fopenmp`) into a per-user cache
(`$XDG_CACHE_HOME/qwen25` or `~/.cache/qwen25`), keyed by the source, the flags and the CPU's feature flags,
and loaded with ctypes. Without an x86 CPU with AVX-512, without a compiler, or with `QWEN25_CPU_KERNELS=0`,
`available()` is False and every caller keeps torch's kernels (`f32_available()` likewise for AVX2). Only
inference uses them (no autograd).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..model import rope
from ..model.moe import SparseMoeBlock
from ..model.layers import MLP, RMSNorm, concat_linears, replace_modules
from ..model.transformer import Attention

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
SOURCE_AVX2 = Path(__file__).with_name("cpu_kernels_avx2.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]
MAX_ROWS = 2  # more activation rows than this (prefill, batches): torch's matmuls are as fast or faster
AMX_MAX_ROWS = 16  # ... except that the bf16 kernel with AMX tiles stays at memory speed up to 16 rows
Q8_MAX_ROWS = 16  # the int8-activation kernel beats torch's int8 kernel at any size, dequantized weights from ~16 on
F32_MAX_ROWS = 16  # the AVX2 fp32 kernel: 1.3-4x torch's up to 16 rows (a decode batch), prompts stay with torch


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwen25"


def _build(source: Path, needs: set[str], what: str) -> ctypes.CDLL | None:
    """Compile `source` for this CPU (cached) and load it; None, with the reason logged, where it cannot be used."""
    if os.environ.get("QWEN25_CPU_KERNELS", "1") == "0":
        return None
    flags = _cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64") or not needs <= flags:
        log.info("cpu kernels: no %s on this CPU; using torch's kernels", what)
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.warning("cpu kernels: no C compiler found (set CC); using torch's kernels")
        return None
    key = hashlib.sha256(source.read_bytes() + " ".join(FLAGS).encode() + " ".join(sorted(flags)).encode())
    target = _cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                proc = subprocess.run([compiler, *FLAGS, str(source), "-o", str(built)], capture_output=True,
                                      text=True)
                if proc.returncode != 0:
                    log.warning("cpu kernels: compiling %s failed; using torch's kernels:\n%s", source,
                                proc.stderr[-2000:])
                    return None
                os.replace(built, target)  # atomic: a concurrent process sees the old file or the whole new one
        return ctypes.CDLL(str(target))
    except OSError as e:  # unwritable cache, a noexec mount, ...: serving goes on with torch's kernels
        log.warning("cpu kernels: cannot build or load %s (%s); using torch's kernels", target, e)
        return None


@functools.cache
def _library_avx2() -> ctypes.CDLL | None:
    """The AVX2 fp32 kernel (cpu_kernels_avx2.c), or None."""
    lib = _build(SOURCE_AVX2, {"avx2", "fma", "f16c"}, "AVX2/FMA")
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.qwen25_linear_f32.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
        lib.qwen25_linear_int8_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
        lib.qwen25_linear_q8_f32.argtypes = lib.qwen25_linear_int8_f32.argtypes
        lib.qwen25_linear_q4_f32.argtypes = lib.qwen25_linear_int8_f32.argtypes
        lib.qwen25_dequant_q4_f32.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_int]
        lib.qwen25_rms_norm_f32.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_float, ctypes.c_int]
        lib.qwen25_rope_f32.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, ctypes.c_int]
        for name in ("linear_f32", "linear_int8_f32", "linear_q8_f32", "linear_q4_f32", "dequant_q4_f32",
                     "rms_norm_f32", "rope_f32"):
            getattr(lib, f"qwen25_{name}").restype = None
    return lib


def f32_available() -> bool:
    """Whether the AVX2 fp32 decode kernel can be used on this machine."""
    return _library_avx2() is not None


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with the reason logged) where they cannot be used here."""
    lib = _build(SOURCE, {"avx512f", "avx512bw", "avx512vl"}, "AVX-512")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.qwen25_linear_bf16.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.qwen25_linear_int8.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.qwen25_linear_q8.argtypes = lib.qwen25_linear_int8.argtypes
    lib.qwen25_rms_norm_bf16.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_float, ctypes.c_int]
    lib.qwen25_rope_bf16.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, ctypes.c_int]
    lib.qwen25_moe_bf16.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int, ptr, i64, i64, i64, i64,
                                    ctypes.c_int]
    lib.qwen25_moe_route.argtypes = [ptr, i64, i64, i64, ctypes.c_int, ptr, ptr, ptr, ctypes.c_int]
    lib.qwen25_moe_route.restype = None
    lib.qwen25_rms_norm_bf16.restype = lib.qwen25_rope_bf16.restype = None
    lib.qwen25_linear_bf16.restype = lib.qwen25_linear_int8.restype = lib.qwen25_linear_q8.restype = None
    return lib


def available() -> bool:
    """Whether the compiled kernels can be used on this machine."""
    return _library() is not None


@functools.cache
def amx() -> bool:
    """Whether the bf16 kernel uses AMX tiles here (compiled for a CPU with AMX-BF16, tile state granted by Linux)."""
    return available() and _library().qwen25_amx() == 1


def bf16_max_rows(in_features: int) -> int:
    """How many activation rows linear_bf16 should take for a layer with this many input features."""
    return AMX_MAX_ROWS if in_features % 32 == 0 and amx() else MAX_ROWS


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def _check(x: torch.Tensor, k: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x, contiguous, if the kernels can take it (`dtype` on the CPU, k features); a ValueError otherwise."""
    if x.dtype != dtype or x.device.type != "cpu" or x.shape[-1] != k:
        raise ValueError(f"cpu kernels take {_NAMES[dtype]} CPU activations with {k} features; got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    return x.contiguous()


def _call(kernel, x: torch.Tensor, weight: torch.Tensor, scale, bias, dtype: torch.dtype) -> torch.Tensor:
    """out (..., N) = kernel(weight (N, K), [scale,] x (..., K), bias): the arguments every linear kernel takes
    (scale None: a kernel without one)."""
    x = _check(x, weight.shape[1], dtype)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    scales = () if scale is None else (_ptr(scale),)
    kernel(_ptr(weight), *scales, _ptr(x), _ptr(bias), _ptr(out), x.numel() // weight.shape[1], weight.shape[0],
           weight.shape[1], torch.get_num_threads())
    return out


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for bf16 x (..., K) and weight (N, K); bias fp32 or None."""
    return _call(_library().qwen25_linear_bf16, x, weight, None, bias, torch.bfloat16)


def linear_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for fp32 x (..., K), weight (N, K) and bias, by the AVX2 kernel."""
    return _call(_library_avx2().qwen25_linear_f32, x, weight, None, bias, torch.float32)


def linear_int8_f32(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """bias + (x @ qweight.T) * scale for fp32 x (..., K), int8 qweight (N, K), fp32 scale (N,) and bias (AVX2)."""
    return _call(_library_avx2().qwen25_linear_int8_f32, x, qweight, scale, bias, torch.float32)


def linear_q8_f32(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """bias + (xq @ qweight.T) * scale, xq being fp32 x (..., K) quantized per block of 32 as llama.cpp's Q8_0 does
    (d = max|x| / 127, xq = d * round(x / d)); int8 qweight (N, K), K a multiple of 32 (AVX2, `--w8a8`)."""
    if qweight.shape[1] % 32:
        raise ValueError(f"linear_q8_f32 needs a multiple of 32 input features, got {qweight.shape[1]}")
    return _call(_library_avx2().qwen25_linear_q8_f32, x, qweight, scale, bias, torch.float32)


def linear_q4_f32(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """bias + sum over blocks of 32 inputs of scales[n, b] * d[m, b] * (xq @ (q - 8).T) for fp32 x (..., K): 4-bit
    weights in llama.cpp's Q4_0 layout (quant.quantize_q4: qweight (N, K / 2) uint8, scales (N, K / 32) fp16), the
    activations quantized per block of 32 as linear_q8_f32 does (`--int4`, AVX2). K a multiple of 32."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if k % 32 or qweight.dtype != torch.uint8 or scales.dtype != torch.float16 or scales.shape != (n, k // 32):
        raise ValueError(f"linear_q4_f32 takes uint8 (N, K / 2) weights and fp16 (N, K / 32) scales, K a multiple of "
                         f"32; got {qweight.dtype} {tuple(qweight.shape)} and {scales.dtype} {tuple(scales.shape)}")
    x = _check(x, k, torch.float32)
    out = x.new_empty(*x.shape[:-1], n)
    _library_avx2().qwen25_linear_q4_f32(_ptr(qweight), _ptr(scales), _ptr(x), _ptr(bias), _ptr(out),
                                         x.numel() // k, n, k, torch.get_num_threads())
    return out


def dequant_q4_f32(qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 weight (N, K) of linear_q4_f32's 4-bit one (quant.dequantize_q4, by the AVX2 kernel), written into
    `out` (fp32, N * K elements or more, contiguous) if given: a reused buffer spares the page faults of a fresh one."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if out is None:
        out = torch.empty(n, k)
    elif out.dtype != torch.float32 or not out.is_contiguous() or out.numel() < n * k:
        raise ValueError(f"dequant_q4_f32: out must be a contiguous fp32 tensor of at least {n * k} elements")
    out = out.view(-1)[:n * k].view(n, k)
    _library_avx2().qwen25_dequant_q4_f32(_ptr(qweight.contiguous()), _ptr(scales.contiguous()), _ptr(out), n, k,
                                          torch.get_num_threads())
    return out


def use_f32_kernel(x: torch.Tensor) -> bool:
    """Whether fp32 activations x should take an AVX2 kernel (a decode step: at most F32_MAX_ROWS rows)."""
    return (x.dtype == torch.float32 and x.numel() <= F32_MAX_ROWS * x.shape[-1] and x.device.type == "cpu"
            and not x.requires_grad and f32_available())


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """bias + (x @ qweight.T) * scale for bf16 x (..., K), int8 qweight (N, K), fp32 scale (N,) and bias."""
    return _call(_library().qwen25_linear_int8, x, qweight, scale, bias, torch.bfloat16)


def linear_q8(x: torch.Tensor, weight_u8: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """bias + (xq @ (weight_u8 - 128).T) * scale, where xq is x (bf16, (..., K)) quantized per block of 32 as
    llama.cpp's Q8_0 does (d = max|x| / 127 per block, xq = d * round(x / d)); weight_u8 (N, K) uint8 holds the int8
    weights plus 128 (vpdpbusd multiplies unsigned by signed bytes); scale and bias are fp32 (N,)."""
    return _call(_library().qwen25_linear_q8, x, weight_u8, scale, bias, torch.bfloat16)


def use_kernel(x: torch.Tensor, max_rows: int | None = MAX_ROWS) -> bool:
    """Whether a call with activations x should take the compiled kernel (bf16, CPU, no autograd; at most max_rows
    rows unless None)."""
    return (x.dtype == torch.bfloat16 and (max_rows is None or x.numel() <= max_rows * x.shape[-1])
            and x.device.type == "cpu" and not x.requires_grad and available())


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms_norm(x.float()).to(bf16) (RMSNorm.forward) for bf16 x (..., K) and weight (K,)."""
    x = _check(x, weight.shape[0])
    out = torch.empty_like(x)
    _library().qwen25_rms_norm_bf16(_ptr(x), _ptr(weight), _ptr(out), x.numel() // x.shape[-1], x.shape[-1], eps,
                                    torch.get_num_threads())
    return out


def rms_norm_f32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms_norm(x) (RMSNorm.forward) for fp32 x (..., K) and weight (K,), by the AVX2 kernel."""
    x = _check(x, weight.shape[0], torch.float32)
    out = torch.empty_like(x)
    _library_avx2().qwen25_rms_norm_f32(_ptr(x), _ptr(weight.contiguous()), _ptr(out), x.numel() // x.shape[-1],
                                        x.shape[-1], eps, torch.get_num_threads())
    return out


def rope_bf16(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """model.rope.apply_rope for bf16 x (B, H, T, D) with unit stride in D (any other strides) and contiguous
    fp32 tables (B or 1, T, D); returns a contiguous tensor."""
    return _rope(_library().qwen25_rope_bf16, x, cos, sin, torch.bfloat16)


def rope_f32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """model.rope.apply_rope for fp32 x (B, H, T, D) as rope_bf16 takes it (AVX2); the same products and sums."""
    return _rope(_library_avx2().qwen25_rope_f32, x, cos, sin, torch.float32)


def _rope(kernel, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    b, h, t, d = x.shape
    _check(x, d, dtype)  # x keeps its strides: the kernel takes them
    if not _rope_layout(x, cos, sin):
        raise ValueError(f"rope kernel: unsupported layout x {tuple(x.shape)} {x.stride()}, tables {cos.dtype} "
                         f"{tuple(cos.shape)}")
    out = x.new_empty(b, h, t, d)
    kernel(_ptr(x), x.stride(0), x.stride(1), x.stride(2), _ptr(cos), _ptr(sin), 0 if cos.shape[0] == 1 else t * d,
           _ptr(out), b, h, t, d, torch.get_num_threads())
    return out


def _rope_layout(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether rope_bf16 takes these: unit stride in x's last dimension, contiguous fp32 (B or 1, T, D) tables."""
    b, _, t, d = x.shape
    return (x.stride(-1) == 1 and cos.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()
            and cos.shape[-2:] == (t, d) and sin.shape == cos.shape and cos.shape[0] in (1, b))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The model's apply_rope, through a kernel for bf16 (AVX-512) or fp32 (AVX2) activations when the layout
    allows."""
    if use_kernel(x, None) and _rope_layout(x, cos, sin):
        return rope_bf16(x, cos, sin)
    if _f32_elementwise(x) and _rope_layout(x, cos, sin) and x.shape[-1] % 2 == 0:
        return rope_f32(x, cos, sin)
    return rope.apply_rope(x, cos, sin)


def _f32_elementwise(x: torch.Tensor) -> bool:
    """Whether fp32 activations x should take the AVX2 RMSNorm/RoPE kernels (CPU, no autograd)."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad and f32_available()


class DecodeLinear(nn.Module):
    """An inference-only nn.Linear (bf16 or fp32 weight) that takes the compiled kernel for a few rows (bf16:
    AVX-512; fp32: AVX2), F.linear else."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        # the same Parameter objects: a tied lm_head stays the embedding's tensor
        weight = linear.weight if linear.weight.is_contiguous() else nn.Parameter(linear.weight.detach().contiguous())
        self.weight = weight.requires_grad_(False)
        self.bias = None if linear.bias is None else linear.bias.requires_grad_(False)
        self.register_buffer("bias_f32", None if linear.bias is None else linear.bias.detach().float(),
                             persistent=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.f32 = weight.dtype == torch.float32
        self.max_rows = F32_MAX_ROWS if self.f32 else bf16_max_rows(linear.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.f32:
            if use_f32_kernel(x):
                return linear_f32(x, self.weight, self.bias_f32)
        elif use_kernel(x, self.max_rows):
            return linear_bf16(x, self.weight, self.bias_f32)
        return F.linear(x, self.weight, self.bias)


class KernelRMSNorm(RMSNorm):
    """An inference-only RMSNorm that takes a compiled kernel (bf16 weight and activations: AVX-512; fp32: AVX2):
    one pass over the rows instead of torch's ~9 ops, torch's ops else. The same result but for the order of the
    fp32 sum of squares, which moves about one bf16 output in 10^5 by one step (fp32: a few ulps)."""

    def __init__(self, norm: RMSNorm):
        nn.Module.__init__(self)
        self.weight, self.eps = norm.weight.requires_grad_(False), norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_kernel(x, None) and self.weight.dtype == torch.bfloat16:
            return rms_norm_bf16(x, self.weight, self.eps)
        if _f32_elementwise(x) and self.weight.dtype == torch.float32:
            return rms_norm_f32(x, self.weight, self.eps)
        return super().forward(x)


def pack_tiles(weight: torch.Tensor) -> torch.Tensor:
    """(..., N, K) weights as AMX B tiles: (..., N / 16, K / 2, 16, 2), packed[.., n // 16, k // 2, n % 16, k % 2] =
    weight[.., n, k], so that 16 outputs x 32 inputs are one contiguous kilobyte."""
    *lead, n, k = weight.shape
    return weight.reshape(*lead, n // 16, 16, k // 2, 2).transpose(-3, -2).contiguous()


def moe_bf16(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, token: torch.Tensor,
             offsets: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, add: bool = True,
             y: torch.Tensor | None = None) -> torch.Tensor:
    """out[token[a]] += weights[a] * expert_e(x[token[a]]) for the assignments a of each expert e, in place (written
    instead of added to when not add: then each token needs exactly one assignment); y, if given, gets out in bf16.

    expert_e(v) = down_e(bf16(silu(gate_e v) * up_e v)), products in fp32. x (T, H) bf16 contiguous; gate_up
    (E, 2I, H) and down (E, H, I) bf16 packed with pack_tiles (gate's I rows then up's); token (A,) int64 rows of x
    grouped by expert, offsets (E + 1,) int64 where each expert's assignments start; weights (A,) fp32; out (T, H)
    fp32, y (T, H) bf16. H and I multiples of 32; AMX only (see amx())."""
    e, h, i = down.shape[0], x.shape[1], down.shape[-3] * 2
    if (not amx() or h % 32 or i % 32 or out.dtype != torch.float32 or out.shape != x.shape
            or gate_up.shape[:2] != (e, 2 * i // 16) or (y is not None and (y.dtype, y.shape) != (x.dtype, x.shape))):
        raise ValueError(f"moe kernel: needs AMX and packed weights with hidden and intermediate sizes multiples of "
                         f"32; got x {tuple(x.shape)}, gate_up {tuple(gate_up.shape)}, down {tuple(down.shape)}")
    _library().qwen25_moe_bf16(_ptr(_check(x, h)), _ptr(gate_up), _ptr(down), _ptr(token.contiguous()),
                               _ptr(offsets.contiguous()), _ptr(weights.contiguous()), _ptr(out), int(add), _ptr(y),
                               x.shape[0], h, i, e, torch.get_num_threads())
    return out


def moe_route(logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, ...]:
    """(token, offsets, weights) for moe_bf16 from router logits (T, E): model.moe.route's choice (top-k of the fp32
    softmax, renormalised if norm_topk_prob) with the assignments grouped by expert, tokens ascending."""
    logits = logits.float().contiguous()
    t, e = logits.shape
    if e > 1024:  # the kernel keeps a token's probabilities on the stack
        raise ValueError(f"moe routing kernel: at most 1024 experts, got {e}")
    token, weights = torch.empty(t * top_k, dtype=torch.int64), torch.empty(t * top_k)
    offsets = torch.empty(e + 1, dtype=torch.int64)
    _library().qwen25_moe_route(_ptr(logits), t, e, top_k, int(norm_topk_prob), _ptr(token), _ptr(weights),
                                _ptr(offsets), torch.get_num_threads())
    return token, offsets, weights


def _mlp_weights(mlp: MLP) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate and up stacked (2I, H), down (H, I)) of a SwiGLU MLP, fused (fuse_projections) or not."""
    gate_up = mlp.gate_up_proj.weight if mlp.gate_up_proj is not None else torch.cat(
        [mlp.gate_proj.weight, mlp.up_proj.weight])
    return gate_up.detach(), mlp.down_proj.weight.detach()


class KernelMoeBlock(SparseMoeBlock):
    """An inference-only SparseMoeBlock whose shared and routed experts run in one AMX kernel call each.

    The router and the shared expert's gate become one Linear (`router`, their outputs side by side); the experts'
    weights are kept only as AMX tiles (pack_tiles), so the block holds the same bytes as before. A token's
    output is summed in fp32 (the shared expert, then its experts in id order) and rounded to bf16 once; inside an
    expert only the SwiGLU's output is rounded to bf16 (torch's ops round gate, up, silu and their product), so
    the result is closer to the exact one than the torch block's.
    """

    def __init__(self, block: SparseMoeBlock):
        nn.Module.__init__(self)
        self.num_experts, self.top_k, self.norm_topk_prob = block.num_experts, block.top_k, block.norm_topk_prob
        self.router = concat_linears([block.gate, block.shared_expert_gate])
        self.router_logits = None
        routed = [_mlp_weights(m) for m in block.experts]
        self.register_buffer("gate_up", pack_tiles(torch.stack([g for g, _ in routed])), persistent=False)
        self.register_buffer("down", pack_tiles(torch.stack([d for _, d in routed])), persistent=False)
        del routed
        gate_up, down = _mlp_weights(block.shared_expert)
        self.register_buffer("shared_gate_up", pack_tiles(gate_up[None]), persistent=False)
        self.register_buffer("shared_down", pack_tiles(down[None]), persistent=False)

    @staticmethod
    def fits(block: nn.Module) -> bool:
        """Whether a block can take the kernel: a bf16 CPU SparseMoeBlock of plain (or fused) bf16 Linear experts,
        hidden and intermediate sizes multiples of 32, on a CPU with AMX."""
        if type(block) is not SparseMoeBlock or not amx():
            return False
        mlps = [*block.experts, block.shared_expert]
        linears = [m for mlp in mlps for m in mlp.children() if m is not None]
        return (all(type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"
                    for m in linears)
                and all(m.weight.shape[0] % 32 == 0 and m.weight.shape[1] % 32 == 0 for m in linears))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, t = x.shape, x.numel() // x.shape[-1]
        x = x.reshape(t, shape[-1]).contiguous()
        logits = self.router(x)
        self.router_logits = logits[:, :self.num_experts]
        out, y = torch.empty(x.shape, dtype=torch.float32), torch.empty_like(x)
        moe_bf16(x, self.shared_gate_up, self.shared_down, torch.arange(t), torch.tensor([0, t]),
                 torch.sigmoid(logits[:, -1].float()), out, add=False)
        moe_bf16(x, self.gate_up, self.down, *moe_route(self.router_logits, self.top_k, self.norm_topk_prob), out,
                 y=y)
        return y.view(shape)


def use_cpu_kernels(model: nn.Module) -> int:
    """Swap every CPU nn.Linear of `model` (in place) for a DecodeLinear, every RMSNorm for a KernelRMSNorm, and the
    attention layers' RoPE for the kernel's, for the dtypes whose kernels are built (bf16: AVX-512; fp32: AVX2);
    returns how many linear layers were swapped.

    Does nothing (returns 0) where the kernels are unavailable. For inference: the weights stop requiring
    grad. Tied weights stay shared (the lm_head keeps the embedding's tensor). Int8Linear layers (quant.py)
    pick the int8 kernel by themselves.
    """
    dtypes = {dtype for dtype, built in ((torch.float32, f32_available()), (torch.bfloat16, available())) if built}
    if not dtypes:
        return 0
    if torch.bfloat16 in dtypes:  # AMX experts first: their bf16 Linear layers are not swapped afterwards
        replace_modules(model, lambda name, m: KernelMoeBlock.fits(m), KernelMoeBlock)
    replace_modules(model, lambda name, m: type(m) is RMSNorm and m.weight.dtype in dtypes
                    and m.weight.device.type == "cpu", KernelRMSNorm)
    for module in model.modules():
        if isinstance(module, Attention):
            module.apply_rope = apply_rope
    return replace_modules(model, lambda name, m: type(m) is nn.Linear and m.weight.dtype in dtypes
                           and m.weight.device.type == "cpu", DecodeLinear)
