"""Decode and prefill against llama.cpp at the Qwen2.5-0.5B shape: `llama-bench` on GGUF files of the same
random weights (bf16, Q8_0 and Q4_0) and qwen25 as `qwen25 serve` prepares it (bf16/fp32, --w8a8 and --int4), in
alternating rounds.

    python benchmarks/llama_cpp.py --build BUILD [--llama-cpp SRC [--python PY]] [--work DIR] [--rounds 2]
        [--dtype auto|bf16|fp32]

--dtype auto: bf16 where the AVX-512 kernels are built, else fp32 (an AVX2 CPU: bf16 matmuls are slow there).
The Q4_0 file is llama-quantize's Q4_0 with the output and token-embedding matrices at Q8_0, as --int4 keeps the
output layer 8-bit (llama-quantize would otherwise choose Q6_K there); --int4 runs with fp32 activations only.

llama.cpp is not a dependency of this project: build it yourself (docs/benchmarks.md has the commands used
here, from the llama-cpp-python source distribution). SRC is llama.cpp's source tree (convert_hf_to_gguf.py),
BUILD its build directory (bin/llama-bench, bin/llama-quantize), PY a Python with the converter's requirements.
The first run writes the checkpoint (benchmarks/serve.py's random 0.5B weights and the real Qwen vocabulary)
and the two GGUF files into --work; later runs reuse them. llama-bench: `-t THREADS -p 128 -n 128 -r 3`
(prompt processing of 128 tokens, 128 generated tokens from an empty context); ours: a 128-token prompt, then
128 greedy tokens. Prints the medians over rounds, the ratios, and a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_line  # noqa: E402
from decode import run_ours  # noqa: E402
from serve import write_checkpoint  # noqa: E402

from qwen25.config import ModelConfig  # noqa: E402
from qwen25.model import load_model  # noqa: E402
from qwen25.export import write_gguf  # noqa: E402
from qwen25.serve import cpu_kernels  # noqa: E402
from qwen25.tokenizer import Tokenizer  # noqa: E402
from qwen25.serve.quant import prepare_for_decode  # noqa: E402


def make_ggufs(args, work: Path) -> dict[str, Path]:
    """bf16, Q8_0 and Q4_0 GGUF files of the random 0.5B checkpoint (made once)."""
    hf, bf16, q8 = work / "hf-0.5b", work / "qwen-0.5b-bf16.gguf", work / "qwen-0.5b-q8_0.gguf"
    q4 = work / "qwen-0.5b-q4_0.gguf"
    if not (hf / "config.json").is_file():
        write_checkpoint(ModelConfig.from_preset("0.5b"), hf, torch.bfloat16)
    if not bf16.is_file() and args.llama_cpp:
        subprocess.run([args.python, str(Path(args.llama_cpp) / "convert_hf_to_gguf.py"), str(hf), "--outtype",
                        "bf16", "--outfile", str(bf16)], check=True)
    elif not bf16.is_file():  # our writer (tests/test_export.py: the converter's keys, values and tensors)
        write_gguf(load_model(hf, dtype="bf16"), Tokenizer.from_dir(hf), bf16, "bf16")
    if not q8.is_file():
        subprocess.run([str(Path(args.build) / "bin" / "llama-quantize"), str(bf16), str(q8), "Q8_0"], check=True,
                       env=_env(args))
    if not q4.is_file():
        subprocess.run([str(Path(args.build) / "bin" / "llama-quantize"), "--output-tensor-type", "q8_0",
                        "--token-embedding-type", "q8_0", str(bf16), str(q4), "Q4_0"], check=True, env=_env(args))
    return {"bf16": bf16, "Q8_0": q8, "Q4_0": q4}


def _env(args) -> dict:
    lib = str(Path(args.build) / "bin")
    return {**os.environ, "LD_LIBRARY_PATH": lib + os.pathsep + os.environ.get("LD_LIBRARY_PATH", "")}


def llama_bench(args, gguf: Path) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) from llama-bench's JSON output."""
    out = subprocess.run([str(Path(args.build) / "bin" / "llama-bench"), "-m", str(gguf), "-t", str(args.threads),
                          "-p", "128", "-n", "128", "-r", "3", "-o", "json"], check=True, capture_output=True,
                         text=True, env=_env(args)).stdout
    rows = json.loads(out)
    prompt = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    gen = next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return prompt, gen


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", help="llama.cpp source tree (its convert_hf_to_gguf.py writes the bf16 file; "
                                       "without it, qwen25's GGUF writer does)")
    ap.add_argument("--build", required=True, help="llama.cpp build directory")
    ap.add_argument("--python", default=sys.executable, help="Python that runs convert_hf_to_gguf.py")
    ap.add_argument("--work", default="/tmp/qwen25-llama-cpp", help="where the checkpoint and GGUF files go")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="qwen25's compute dtype")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ggufs = make_ggufs(args, work)

    # the checkpoint the GGUF files were converted from, through our own loader
    dtype = args.dtype if args.dtype != "auto" else "bf16" if cpu_kernels.available() else "fp32"
    variants = {dtype: {}, "w8a8": {"w8a8": True}, **({"int4": {"int4": True}} if dtype == "fp32" else {})}
    ours = {}
    for kind, flags in variants.items():
        ours[kind] = load_model(work / "hf-0.5b", dtype=dtype)
        print(f"qwen25 {kind}: {prepare_for_decode(ours[kind], **flags)}")
    prompt = torch.randint(0, 151643, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    for model in ours.values():
        run_ours(model, prompt[:16], 4)  # warm-up

    samples: dict[str, list[tuple[float, float]]] = {
        k: [] for k in [*(f"llama.cpp {kind}" for kind in ggufs), *(f"qwen25 {kind}" for kind in ours)]}
    for r in range(args.rounds):
        for kind, path in ggufs.items():
            samples[f"llama.cpp {kind}"].append(llama_bench(args, path))
        for kind, model in ours.items():
            prefill_s, decode = run_ours(model, prompt, 128)
            samples[f"qwen25 {kind}"].append((128 / prefill_s, decode))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1][1]:.2f}" for k, v in samples.items()))
    med = {k: (statistics.median(p for p, _ in v), statistics.median(g for _, g in v)) for k, v in samples.items()}
    print(f"{'':16s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for k, (p, g) in med.items():
        print(f"{k:16s} {p:14.1f} {g:13.2f}")
    ratios = {f"{dtype}_vs_bf16_decode": med[f"qwen25 {dtype}"][1] / med["llama.cpp bf16"][1],
              "w8a8_vs_q8_0_decode": med["qwen25 w8a8"][1] / med["llama.cpp Q8_0"][1],
              f"{dtype}_vs_bf16_prefill": med[f"qwen25 {dtype}"][0] / med["llama.cpp bf16"][0]}
    if "int4" in ours:
        ratios["int4_vs_q4_0_decode"] = med["qwen25 int4"][1] / med["llama.cpp Q4_0"][1]
        ratios["int4_vs_q4_0_prefill"] = med["qwen25 int4"][0] / med["llama.cpp Q4_0"][0]
    print("ratios (qwen25 / llama.cpp): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(result_line("llama_cpp", threads=args.threads, rounds=args.rounds, dtype=dtype,
                      results={k: dict(prefill_tok_s=round(p, 1), decode_tok_s=round(g, 2)) for k, (p, g) in med.items()},
                      ratios={k: round(v, 2) for k, v in ratios.items()}))


if __name__ == "__main__":
    main()
