"""Decode and prefill speed at the Qwen2.5-0.5B shape (or any preset, MoE too): qwen25 vs transformers, same
weights, same process.

    python benchmarks/decode.py [--preset 0.5b] [--prompt 128] [--new 128] [--threads 2] [--dtypes bf16,fp32] [--no-int8]
        [--no-int4] [--no-kernels] [--rounds 3]

Random weights (speed does not depend on their values), batch 1, greedy decoding of exactly --new tokens;
the median of --rounds measurements (ours and transformers interleaved).
Prints tokens/s for both, the ratio, achieved weight-read GB/s as a share of the measured memory bandwidth,
and a JSON line last.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import read_bandwidth, result_line  # noqa: E402

from qwen25.config import ModelConfig, param_count  # noqa: E402
from qwen25.generation import SamplingParams, stream_generate  # noqa: E402
from qwen25.model import CausalLM  # noqa: E402
from qwen25.serve.quant import prepare_for_decode  # noqa: E402


def run_ours(model, prompt, new_tokens):
    params = SamplingParams(max_new_tokens=new_tokens)
    start = time.perf_counter()
    stream = stream_generate(model, [prompt], params)
    next(stream)  # the first token comes right after prefill
    first = time.perf_counter()
    count = 1 + sum(1 for _ in stream)
    end = time.perf_counter()
    return first - start, (count - 1) / (end - first)


def decode_bytes(model) -> int:
    """Bytes a decode step reads: every parameter and buffer but the input embedding (one row per token), counting a
    tensor shared by two modules once."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if t.data_ptr() in seen or name.startswith("model.embed_tokens"):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def median_round(results):
    """The median prefill time and the median decode tokens/s of several rounds' (prefill_s, decode_tok_s)."""
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


class _Clock:
    """A transformers streamer that records when each generated token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_transformers(model, prompt, new_tokens):
    ids = torch.tensor([prompt])
    clock = _Clock()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, streamer=clock)
    assert out.shape[1] == len(prompt) + new_tokens and len(clock.times) == new_tokens + 1
    first, last = clock.times[1], clock.times[-1]
    return first - start, (new_tokens - 1) / (last - first)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.5b")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per model (medians are printed)")
    ap.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure --int8 and --w8a8 after each dtype's run")
    ap.add_argument("--int4", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure --int4 (4-bit weights, int8 decode activations) with fp32 (AVX2 kernels)")
    ap.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                    help="qwen25 with its compiled AVX-512 decode kernels where the CPU has them (serve's default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    cfg = ModelConfig.from_preset(args.preset)
    hf_name = "Qwen2Moe" if cfg.model_type == "qwen2_moe" else "Qwen2"
    hf_config, hf_model = getattr(transformers, f"{hf_name}Config"), getattr(transformers, f"{hf_name}ForCausalLM")
    bandwidth = read_bandwidth()
    print(f"preset {args.preset}: {param_count(cfg) / 1e6:.0f}M parameters, {args.threads} threads, "
          f"prompt {args.prompt}, new {args.new}; measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
    torch.manual_seed(0)
    prompt = torch.randint(0, min(151643, cfg.vocab_size), (args.prompt,)).tolist()
    results = {}
    for name in args.dtypes.split(","):
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        hf_cfg = hf_config(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "torch_dtype")})
        with torch.device("meta"):
            ours = CausalLM(cfg)
        ours = ours.to_empty(device="cpu").to(dtype)
        ours.init_weights(seed=0)
        ours.reset_rope()
        ours.eval()
        hf = hf_model(hf_cfg).to(dtype).eval()
        hf.load_state_dict(ours.state_dict(), strict=False)
        print(f"[{name}] qwen25 as `qwen25 serve` prepares it: {prepare_for_decode(ours, kernels=args.kernels)}")
        run_ours(ours, prompt[:16], 4)  # warm-up
        run_transformers(hf, prompt[:16], 4)
        rounds = [(run_ours(ours, prompt, args.new), run_transformers(hf, prompt, args.new))
                  for _ in range(args.rounds)]  # interleaved: a busy spell of the machine hits both
        o_prefill, o_decode = median_round([r[0] for r in rounds])
        h_prefill, h_decode = median_round([r[1] for r in rounds])
        weight_bytes = param_count(cfg, activated=True) * (2 if dtype == torch.bfloat16 else 4)  # read a step
        share = weight_bytes * o_decode / bandwidth
        print(f"[{name}] decode  qwen25 {o_decode:7.2f} tok/s   transformers {h_decode:7.2f} tok/s   "
              f"ratio {o_decode / h_decode:.2f}x   ({weight_bytes * o_decode / 1e9:.1f} GB/s, {share:.0%} of measured)")
        print(f"[{name}] prefill qwen25 {args.prompt / o_prefill:7.1f} tok/s   transformers "
              f"{args.prompt / h_prefill:7.1f} tok/s   ratio {h_prefill / o_prefill:.2f}x")
        variants = [("int8", {"int8": True}), ("w8a8", {"w8a8": True})] if args.int8 else []
        if args.int4 and dtype == torch.float32:
            variants.append(("int4", {"int4": True}))
        for variant, flags in variants:  # quantized copies of the prepared model, as `serve --int8|--w8a8|--int4`
            quantized = copy.deepcopy(ours)
            what = prepare_for_decode(quantized, kernels=args.kernels, **flags)
            run_ours(quantized, prompt[:16], 4)
            q_prefill, q_decode = median_round([run_ours(quantized, prompt, args.new) for _ in range(args.rounds)])
            q_bytes = decode_bytes(quantized)
            print(f"[{name} {variant}] decode  qwen25 {q_decode:7.2f} tok/s   ratio {q_decode / h_decode:.2f}x vs "
                  f"transformers {name};  prefill {args.prompt / q_prefill:.1f} tok/s   ({q_bytes * q_decode / 1e9:.1f} "
                  f"GB/s, {q_bytes * q_decode / bandwidth:.0%} of measured; {what})")
            results[f"{name}_{variant}" if dtype == torch.float32 else variant] = dict(
                decode_tok_s=round(q_decode, 2), decode_ratio_vs_hf=round(q_decode / h_decode, 2),
                prefill_tok_s=round(args.prompt / q_prefill, 1),
                bandwidth_share=round(q_bytes * q_decode / bandwidth, 3))
            del quantized
        results[name] = dict(decode_tok_s=round(o_decode, 2), hf_decode_tok_s=round(h_decode, 2),
                             decode_ratio=round(o_decode / h_decode, 2), prefill_tok_s=round(args.prompt / o_prefill, 1),
                             hf_prefill_tok_s=round(args.prompt / h_prefill, 1),
                             prefill_ratio=round(h_prefill / o_prefill, 2), bandwidth_share=round(share, 3))
        del ours, hf
    print(result_line("decode", preset=args.preset, threads=args.threads, prompt=args.prompt, new=args.new,
                      results=results))


if __name__ == "__main__":
    main()
