"""Int8 weights for decoding: per-output-channel symmetric scales; optionally int8 activations too.

Decoding one token reads every weight once, so it is bound by memory traffic; int8 weights halve it
compared with bf16. A few bf16 rows (decode) take the compiled kernel of cpu_kernels.py where the CPU has
AVX-512; otherwise the matmul uses torch's packed int8-weight kernel (`aten._weight_int8pack_mm`, the kernel
gpt-fast uses), which dequantizes on the fly.

Weight-only int8 widens every weight to fp32 on the fly, which costs more than streaming it on this project's CPU.
On CPUs with AVX2 but no AVX-512, an fp32 model's `--int8` decode steps take cpu_kernels_avx2.c's int8 kernel
(a quarter of fp32's bytes; ~2x its fp32 kernel for one row).
With `act_int8` (`--w8a8`), decode steps (up to 16 rows) also quantize the activations, per block of 32 as
llama.cpp's Q8_0 does, and multiply bytes by bytes (AVX-512 VNNI, 64 products per instruction): ~1.4x faster
decode for a second rounding of each activation to ~2.5 significant digits. Prefill (more rows) keeps bf16
activations and dequantized weights.

`--int4` stores the decoder's matrices in 4 bits (llama.cpp's Q4_0 layout, quantize_q4) and, for an fp32 model on
an AVX2 CPU, multiplies them with int8 activations per block of 32 (cpu_kernels_avx2.c); the output layer stays
8-bit unless asked (quantize_int4).
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import replace_modules
from . import cpu_kernels

log = logging.getLogger(__name__)

Q4_MAX_ROWS = 32  # the 4-bit kernel up to this many rows (decode, short chunks); longer prompts dequantize into a
# reused buffer + dense matmul (faster from ~32-64 rows at the 0.5B shape)
SCRATCH_MAX = 1 << 26  # weights; a larger 4-bit layer (a 4-bit lm_head) takes the kernel for prompts too
DEQUANT_ROWS = 32  # from this many activation rows on, dequantized weights + dense matmul beat the int8 kernel


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, scales) with weight ~= int8 * scales[:, None]; scales = max|row| / 127."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """A Linear layer whose weight is stored as int8 with one scale per output channel."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, act_int8: bool = False):
        super().__init__()
        q, scales = quantize_per_channel(linear.weight)
        # int8 activations need the compiled kernel, which takes the weights as uint8 = int8 + 128 (one copy only);
        # an fp32 model on an AVX2 CPU takes them as int8 (the AVX2 kernel, for a multiple of 32 input features)
        self.act_int8 = act_int8 and cpu_kernels.available() and dtype == torch.bfloat16
        self.act_int8_avx2 = (act_int8 and not self.act_int8 and dtype == torch.float32
                              and linear.in_features % 32 == 0 and cpu_kernels.f32_available())
        if self.act_int8:
            self.register_buffer("weight_u8", (q.to(torch.int16) + 128).to(torch.uint8))
        else:
            self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scales.to(dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        # fp32 copies for the compiled kernel (it applies scale and bias before its one rounding to bf16)
        self.register_buffer("scales_f32", scales.float(), persistent=False)
        self.register_buffer("bias_f32", None if linear.bias is None else linear.bias.detach().float(),
                             persistent=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def int8_weight(self) -> torch.Tensor:
        """The int8 weight (N, K); with act_int8 a fresh copy from the uint8 one (flipping the top bit = -128)."""
        return self.weight_u8.bitwise_xor(128).view(torch.int8) if self.act_int8 else self.weight_int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_int8 and cpu_kernels.use_kernel(x, cpu_kernels.Q8_MAX_ROWS):
            return cpu_kernels.linear_q8(x, self.weight_u8, self.scales_f32, self.bias_f32)
        if not self.act_int8 and cpu_kernels.use_kernel(x):
            return cpu_kernels.linear_int8(x, self.weight_int8, self.scales_f32, self.bias_f32)
        if not self.act_int8 and cpu_kernels.use_f32_kernel(x):  # fp32 activations, AVX2
            kernel = cpu_kernels.linear_q8_f32 if self.act_int8_avx2 else cpu_kernels.linear_int8_f32
            return kernel(x, self.weight_int8, self.scales_f32, self.bias_f32)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.scales.dtype).contiguous()
        # torch 2.13's int8 kernel returns garbage or crashes on AVX-512 when K is not a multiple of 16 (K=200)
        if x2.device.type == "cpu" and x2.shape[0] < DEQUANT_ROWS and self.in_features % 32 == 0 and not self.act_int8:
            out = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scales)
        else:  # prefill, other backends: dequantize and use the dense matmul (4x faster for 128 rows on CPU)
            out = F.linear(x2, self.int8_weight().to(x2.dtype)) * self.scales
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


def quantize_q4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit weights in llama.cpp's Q4_0 layout: (qweight (N, K / 2) uint8, scales (N, K / 32) fp16), K a multiple
    of 32. Per block of 32 inputs, d = (the value of largest magnitude, signed) / -8 and q = min(15, trunc(w / d +
    8.5)), so w ~= d * (q - 8) and the extreme value is exact; byte j of a block holds q[j] (low nibble) and
    q[j + 16] (high nibble). The arithmetic of gguf's Q4_0 quantizer (the product in fp64), byte for byte."""
    w = weight.detach().float()
    n, k = w.shape
    if k % 32:
        raise ValueError(f"4-bit blocks need a multiple of 32 input features, got {k}")
    blocks = w.view(n, k // 32, 32)
    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    d = extreme / -8
    inv = torch.where(d == 0, 0.0, 1 / d)
    q = torch.trunc(blocks.double() * inv.double() + 8.5).float().clamp(0, 15).to(torch.uint8)
    return (q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2), d.squeeze(-1).to(torch.float16)


def dequantize_q4(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 weight (N, K) that quantize_q4's (qweight, scales) stand for."""
    n, nb = scales.shape
    packed = qweight.view(n, nb, 16)
    q = torch.cat([packed & 15, packed >> 4], dim=-1)
    return ((q.float() - 8) * scales.float()[..., None]).view(n, nb * 32)


_scratch = threading.local()  # one fp32 weight buffer per thread, reused by every Int4Linear's prompt matmuls


class Int4Linear(nn.Module):
    """A Linear layer whose weight is stored in 4 bits (quantize_q4: blocks of 32 with an fp16 scale, 4.5 bits per
    weight). With `kernel` (an fp32 model, AVX2 CPU) up to Q4_MAX_ROWS rows are multiplied with int8 activations in
    cpu_kernels_avx2.c and longer prompts dequantize into a reused buffer for a dense matmul; without it every call
    dequantizes with torch's ops (correct, slow)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, kernel: bool = True):
        super().__init__()
        qweight, scales = quantize_q4(linear.weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        self.register_buffer("bias_f32", None if linear.bias is None else linear.bias.detach().float(),
                             persistent=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel = kernel and dtype == torch.float32 and cpu_kernels.f32_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.kernel and x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad):
            return F.linear(x, dequantize_q4(self.qweight, self.scales).to(x.dtype), self.bias)
        weights = self.qweight.numel() * 2
        if x.numel() <= Q4_MAX_ROWS * self.in_features or weights > SCRATCH_MAX:  # decode; or no buffer that big
            return cpu_kernels.linear_q4_f32(x, self.qweight, self.scales, self.bias_f32)
        scratch = getattr(_scratch, "weight", None)
        if scratch is None or scratch.numel() < weights:
            scratch = _scratch.weight = torch.empty(weights)
        return F.linear(x, cpu_kernels.dequant_q4_f32(self.qweight, self.scales, scratch), self.bias)


def quantize_int4(model: nn.Module, dtype: torch.dtype = torch.float32, head_bits: int = 8,
                  kernels: bool = True) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by an Int4Linear computing in `dtype`; returns the model.

    The output layer (lm_head, a tied one gets its own copy) takes `head_bits` 8 (an Int8Linear with int8 decode
    activations, as --w8a8) or 4; a layer whose input features are not a multiple of 32 stays int8 as well.
    Embeddings stay as they are (a lookup reads one row per token)."""
    if head_bits not in (4, 8):
        raise ValueError(f"head_bits must be 4 or 8, got {head_bits}")
    head = getattr(model, "lm_head", None)

    def make(linear: nn.Module) -> nn.Module:
        if linear.in_features % 32 or (linear is head and head_bits == 8):
            return Int8Linear(linear, dtype, act_int8=kernels)
        return Int4Linear(linear, dtype, kernel=kernels)

    replace_modules(model, lambda name, m: isinstance(m, (nn.Linear, cpu_kernels.DecodeLinear)), make)
    return model


def quantize_int8(model: nn.Module, dtype: torch.dtype = torch.bfloat16, skip: tuple[str, ...] = (),
                  act_int8: bool = False) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by an Int8Linear computing in `dtype`; returns the model.

    Embeddings stay as they are (a lookup reads one row per token). A tied lm_head gets its own int8 copy.
    act_int8: decode steps quantize activations too (needs the compiled kernels; weight-only where they are missing).
    """
    kinds = (nn.Linear, cpu_kernels.DecodeLinear)
    replace_modules(model, lambda name, m: isinstance(m, kinds) and not any(name.startswith(s) for s in skip),
                    lambda linear: Int8Linear(linear, dtype, act_int8))
    return model


def prepare_for_decode(model: nn.Module, *, int8: bool = False, w8a8: bool = False, int4: bool = False,
                       head_bits: int = 8, kernels: bool = True) -> str:
    """What `qwen25 serve` and `qwen25 chat` do to a loaded model; returns a line for the log.

    Fuses q/k/v and gate/up into one matmul each, quantizes the linear layers to int8 weights if asked
    (computing in the model's dtype; w8a8: int8 activations too when decoding, implies int8) or to 4-bit weights
    (int4: quantize_int4, the output layer at `head_bits`), and swaps in the compiled kernels where available
    (bf16: AVX-512; fp32: AVX2).
    """
    if sum((int8, w8a8, int4)) > 1:
        raise ValueError("choose one of --int8, --w8a8 and --int4")
    compute = next(model.parameters()).dtype
    compiled = kernels and cpu_kernels.available() and compute == torch.bfloat16
    avx2 = kernels and compute == torch.float32 and cpu_kernels.f32_available()
    if w8a8 and not (compiled or avx2):
        log.warning("--w8a8 needs the compiled kernels and --dtype bf16 (AVX-512) or fp32 (AVX2); using weight-only "
                    "int8")
    if int4 and not avx2:
        log.warning("--int4 has a fast kernel for --dtype fp32 on AVX2 CPUs (with --kernels) only; elsewhere every "
                    "matmul dequantizes its weight first (slow)")
    model.fuse_projections()
    if int4:
        quantize_int4(model, dtype=compute, head_bits=head_bits, kernels=kernels)
    elif int8 or w8a8:
        if compute == torch.float32 and not (kernels and cpu_kernels.f32_available()):
            log.warning("--int8 with fp32 activations uses the slow path of torch's int8-weight kernel on CPU; "
                        "--dtype bf16 --int8 is the fast combination (or the AVX2 kernels, where available)")
        quantize_int8(model, dtype=compute, act_int8=w8a8 and (compiled or avx2))
    if kernels:
        cpu_kernels.use_cpu_kernels(model)
    amx = ", AMX experts" if compiled and cpu_kernels.amx() else ""
    uses = f"compiled AVX-512 kernels (decode matmuls, norms, RoPE{amx})" if compiled else "torch's kernels"
    if kernels and compute == torch.float32 and cpu_kernels.f32_available():
        uses = "the compiled AVX2 kernels (fp32 decode matmuls, norms, RoPE)"
    quant = (f" 4-bit weights (Q4_0 blocks of 32, output layer {head_bits}-bit), int8 decode activations" if int4
             else " int8 weights and activations (decode)" if w8a8 and (compiled or avx2)
             else " int8 weights" if int8 or w8a8 else "")
    return f"{compute}{quant}, fused projections, {uses}"
