"""A long prompt's prefill beside a running stream, at the Qwen2.5-0.5B shape: how long the prompt takes to its first
token, how fast a short request keeps decoding meanwhile (against decoding alone), and peak memory, for several
`prefill_chunk` sizes (the engine prefills at most that many prompt tokens per step, between decode steps).

    python benchmarks/long_prefill.py [--length 4096] [--chunks 512,64,16] [--dtype fp32] [--threads 2]

Random weights (speed does not depend on them), prepared as `qwen25 serve` prepares them. The short request
(16 prompt tokens, greedy) starts first and decodes throughout; once it runs, the long prompt is submitted. Peak
memory is the process's maximum resident set (it includes the model). Prints a table and a JSON line last.
Dense attention only (the sparse prefill of issue 33 is not built); at 32K+ tokens a run takes many minutes here.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_line  # noqa: E402

from qwen25.config import ModelConfig  # noqa: E402
from qwen25.generation import Engine, Request, SamplingParams  # noqa: E402
from qwen25.model.transformer import CausalLM  # noqa: E402
from qwen25.serve.quant import prepare_for_decode  # noqa: E402


def model_at(preset: str, dtype: torch.dtype) -> CausalLM:
    cfg = ModelConfig.from_preset(preset)
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    model.init_weights(seed=0)
    model.reset_rope()
    print(prepare_for_decode(model.eval()))
    return model


def run(model, length: int, chunk: int | None, solo_steps: int = 12) -> dict:
    """Decode alone for a few steps, then with the long prompt prefilling: tokens/s of the short request in both,
    the long prompt's time to first token."""
    engine = Engine(model, max_batch=2, max_len=length + 2100, prefill_chunk=chunk, prefix_capacity_blocks=0)
    short = engine.submit(Request(list(range(100, 116)), SamplingParams(max_new_tokens=2000)))  # outlasts the prefill
    engine.step()  # its prefill
    start = time.perf_counter()
    for _ in range(solo_steps):
        engine.step()
    solo = solo_steps / (time.perf_counter() - start)
    long = engine.submit(Request(torch.randint(0, 50000, (length,)).tolist(), SamplingParams(max_new_tokens=1)))
    start, tokens, first = time.perf_counter(), 0, None
    while first is None:
        for out in engine.step():
            tokens += out.request_id == short and out.token is not None
            if out.request_id == long and out.token is not None:
                first = time.perf_counter() - start
    return {"chunk": chunk, "ttft_s": round(first, 2), "solo_tok_s": round(solo, 2),
            "during_tok_s": round(tokens / first, 2), "kept": round(tokens / first / solo, 3),
            "prefill_tok_s": round(length / first, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.5b")
    ap.add_argument("--length", type=int, default=4096, help="tokens of the long prompt")
    ap.add_argument("--chunks", default="512,64,16", help="prefill_chunk sizes to try (0: the whole prompt at once)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = model_at(args.preset, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    rows = []
    for chunk in (int(c) for c in args.chunks.split(",")):
        row = run(model, args.length, chunk or None)
        rows.append(row)
        print(f"  chunk {chunk or 'whole':>5}: first token of the {args.length}-token prompt after {row['ttft_s']} s "
              f"({row['prefill_tok_s']} tok/s); the short stream {row['during_tok_s']} tok/s meanwhile vs "
              f"{row['solo_tok_s']} alone ({row['kept']:.0%})", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"peak resident memory {peak:.2f} GiB")
    print(result_line("long_prefill", preset=args.preset, length=args.length, dtype=args.dtype, threads=args.threads,
                      peak_rss_gib=round(peak, 2), results=rows))


if __name__ == "__main__":
    main()
