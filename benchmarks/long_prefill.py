"""Long prompts at the Qwen2.5-0.5B shape, two measurements.

1. A long prompt's prefill beside a running stream: how long the prompt takes to its first token, how fast a short
   request keeps decoding meanwhile (against decoding alone), and peak memory, for several `prefill_chunk` sizes
   (the engine prefills at most that many prompt tokens per step, between decode steps):

    python benchmarks/long_prefill.py [--length 4096] [--chunks 512] [--shares 0,0.5] [--join-at N]

   The short request (16 prompt tokens, greedy) starts first and decodes throughout; once it runs, the long prompt
   is submitted. --shares: the engine's decode_share (0: prefill a chunk every step; 0.5, the server's default: the
   stream keeps half the time and chunks shrink to ~prefill_stall seconds). --join-at N: the prompt's first N tokens
   were read before (prefix cache; once, before every run), so the stream meets only its last length - N tokens,
   where each chunk attends to the most keys: `--length 32768 --join-at 30720` measures the end of a 32K prompt.

2. `--ttft`: time to first token and peak memory of one prompt alone, dense vs sparse prefill (model/sparse.py), with
   and without DCA, each (length, mode) in a fresh process (so its peak resident memory is its own):

    python benchmarks/long_prefill.py --ttft --lengths 8192,32768,131072 --modes dense,sparse \
        [--dense-max 32768] [--prefill-chunk 4096] [--kv-int8]

   Modes: dense, sparse, dense+dca, sparse+dca (DCA: --dca-chunk 32768, --dca-local 4096 by default; DCA changes
   attention only past chunk - local tokens).
   Dense prefill past --dense-max is not run: its time is extrapolated from the measured dense lengths by a fitted
   quadratic (a + b L + c L^2; attention grows with L^2), and the table says so.

Random weights (speed does not depend on them), prepared as `qwen25 serve` prepares them. Peak memory is the
process's maximum resident set (it includes the model). Prints a table and a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_line  # noqa: E402

from qwen25.config import ModelConfig  # noqa: E402
from qwen25.generation import Engine, Request, SamplingParams  # noqa: E402
from qwen25.model import prefill_cost  # noqa: E402
from qwen25.model.sparse import SparsePrefill  # noqa: E402
from qwen25.model.transformer import CausalLM  # noqa: E402
from qwen25.serve.quant import prepare_for_decode  # noqa: E402


def model_at(preset: str, dtype: torch.dtype, **changes) -> CausalLM:
    cfg = ModelConfig.from_preset(preset, **changes)
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    model.init_weights(seed=0)
    model.reset_rope()
    print(prepare_for_decode(model.eval()))
    return model


def run(engine: Engine, length: int, chunk: int | None, share: float, join_at: int = 0, warm: list[int] | None = None,
        solo_steps: int = 12) -> dict:
    """Decode a short request alone for a few steps, then with a long prompt of `length` tokens prefilling beside
    it: tokens/s of the short request in both, the long prompt's time to first token. join_at > 0: the prompt's first
    join_at tokens are `warm`, already read into the engine's prefix cache, so only the rest competes (the hardest
    stretch of a long prompt at a fraction of the time)."""
    model = engine.model
    engine.prefill_chunk, engine.decode_share = chunk, share
    short = engine.submit(Request(list(range(100, 116)), SamplingParams(max_new_tokens=4000)))  # outlasts the prefill
    engine.step()  # its prefill
    start = time.perf_counter()
    for _ in range(solo_steps):
        engine.step()
    solo = solo_steps / (time.perf_counter() - start)
    vocab = min(50000, model.config.vocab_size)
    tail = torch.randint(0, vocab, (length - join_at,)).tolist()  # fresh each run: never in the prefix cache
    long = engine.submit(Request((warm or [])[:join_at] + tail, SamplingParams(max_new_tokens=1)))
    start, tokens, first, stamps = time.perf_counter(), 0, None, []
    with tqdm(total=length - join_at, desc=f"chunk {chunk} share {share}", unit="tok", file=sys.stderr,
              mininterval=5) as bar:
        done = engine.stats["prefill_tokens"]
        while first is None:
            for out in engine.step():
                if out.request_id == short and out.token is not None:
                    tokens += 1
                    stamps.append(time.perf_counter())
                if out.request_id == long and out.token is not None:
                    first = time.perf_counter() - start
            bar.update(engine.stats["prefill_tokens"] - done)
            done = engine.stats["prefill_tokens"]
    engine.cancel(short)
    engine.step()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])] or [first]
    return {"chunk": chunk, "decode_share": share, "join_at": join_at, "ttft_s": round(first, 2),
            "solo_tok_s": round(solo, 2), "during_tok_s": round(tokens / first, 2),
            "kept": round(tokens / first / solo, 3),
            "max_gap_s": round(max(gaps), 2), "prefill_tok_s": round((length - join_at) / first, 1)}


def contention(args) -> list[dict]:
    """run() for every --chunks x --shares in one engine; with --join-at, the prompt's first tokens read once
    (sparse prefill past 8K, in chunks of --prefill-chunk) into the prefix cache, reused by every run."""
    changes = {"max_position_embeddings": max(32768, args.length + 4200)}
    model = model_at(args.preset, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype], **changes)
    block = 256
    engine = Engine(model, max_batch=2, max_len=args.length + 4200, prefix_block=block,
                    prefix_capacity_blocks=2 * args.length // block if args.join_at else 0)
    warm = None
    if args.join_at:
        vocab = min(50000, model.config.vocab_size)
        warm = torch.randint(0, vocab, (args.join_at,), generator=torch.Generator().manual_seed(0)).tolist()
        model.sparse_prefill = SparsePrefill(min_length=8192) if args.join_at > 8192 else None
        engine.prefill_chunk = args.prefill_chunk
        start = time.perf_counter()
        engine.submit(Request(warm, SamplingParams(max_new_tokens=1)))
        with tqdm(total=args.join_at, desc="the prompt's first tokens", unit="tok", file=sys.stderr,
                  mininterval=5) as bar:
            while engine.has_work():
                engine.step()
                bar.n = engine.stats["prefill_tokens"]
                bar.refresh()
        model.sparse_prefill = None
        print(f"  the prompt's first {args.join_at} tokens read in {time.perf_counter() - start:.0f} s "
              f"(sparse past 8K), kept in the prefix cache", flush=True)
    rows = []
    for chunk in (int(c) for c in args.chunks.split(",")):
        for share in (float(s) for s in args.shares.split(",")):
            row = run(engine, args.length, chunk or None, share, args.join_at, warm)
            rows.append(row)
            print(f"  chunk {chunk or 'whole':>5} share {share}: the prompt's "
                  f"{'last ' if args.join_at else ''}{args.length - args.join_at} tokens read in {row['ttft_s']} s "
                  f"({row['prefill_tok_s']} tok/s); the short stream {row['during_tok_s']} tok/s meanwhile vs "
                  f"{row['solo_tok_s']} alone ({row['kept']:.0%}), longest wait for a token {row['max_gap_s']} s",
                  flush=True)
    return rows


def ttft_one(args) -> dict:
    """One prompt of --length tokens alone in the engine (mode args.one), in this process: seconds to its first token."""
    length, mode = args.length, args.one
    changes = {"max_position_embeddings": max(131072, length + 16)}
    if "dca" in mode:
        changes["dual_chunk_attention_config"] = {"chunk_size": args.dca_chunk, "local_size": args.dca_local,
                                                  "original_max_position_embeddings": args.dca_chunk}
    model = model_at(args.preset, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype], **changes)
    if mode.startswith("sparse"):
        model.sparse_prefill = SparsePrefill(min_length=args.sparse_min_length, max_keys=args.sparse_max_keys)
    engine = Engine(model, max_batch=1, max_len=length + 16, prefill_chunk=args.prefill_chunk,
                    prefix_capacity_blocks=0, kv_int8=args.kv_int8)
    vocab = min(50000, model.config.vocab_size)
    engine.submit(Request(torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(0)).tolist(),
                          SamplingParams(max_new_tokens=1)))
    start, done = time.perf_counter(), 0
    with tqdm(total=length, desc=f"{mode} {length}", unit="tok", file=sys.stderr, mininterval=5) as bar:
        while engine.has_work():
            engine.step()
            bar.update(engine.stats["prefill_tokens"] - done)
            done = engine.stats["prefill_tokens"]
    seconds = time.perf_counter() - start
    row = {"length": length, "mode": mode, "ttft_s": round(seconds, 3), "prefill_tok_s": round(length / seconds, 1),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "kv_cache_gib": round(engine.cache.nbytes() / 2**30, 2)}
    if model.sparse_prefill is not None:
        row.update({k: round(v, 4) for k, v in model.sparse_prefill.summary().items() if k != "forwards"})
    return row


def quadratic_fit(lengths: list[int], seconds: list[float]):
    """Least-squares a + b L + c L^2 through measured (length, seconds); returns the function."""
    x = torch.tensor(lengths, dtype=torch.float64)
    a = torch.stack([torch.ones_like(x), x, x * x], dim=1)
    coef = torch.linalg.lstsq(a, torch.tensor(seconds, dtype=torch.float64)[:, None]).solution[:, 0]
    return lambda n: float(coef[0] + coef[1] * n + coef[2] * n * n)


def ttft(args) -> None:
    """Every (length, mode) in a fresh process; dense past --dense-max extrapolated; a table of speed-ups."""
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        for mode in args.modes.split(","):
            if mode.startswith("dense") and length > args.dense_max:
                continue
            cmd = [sys.executable, __file__, "--one", mode, "--length", str(length), "--preset", args.preset,
                   "--dtype", args.dtype, "--threads", str(args.threads), "--prefill-chunk", str(args.prefill_chunk),
                   "--sparse-min-length", str(args.sparse_min_length), "--sparse-max-keys", str(args.sparse_max_keys)]
            cmd += ["--kv-int8"] if args.kv_int8 else []
            cmd += ["--dca-chunk", str(args.dca_chunk), "--dca-local", str(args.dca_local)]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"  {mode:>10} {length:>7}: {rows[-1]}", flush=True)
    saved = []
    if args.save:  # dense runs saved earlier with these settings also serve as references
        saved = save_runs(Path(args.save).expanduser(), args, rows)
    table = ["| length | mode | time to first token | prefill tok/s | peak memory | vs dense | keys kept |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        dense_mode = row["mode"].replace("sparse", "dense")
        measured = {r["length"]: r["ttft_s"] for r in saved + rows if r["mode"] == dense_mode}
        if row["length"] in measured:
            ref, how = measured[row["length"]], ""
        elif len(measured) >= 3:
            ref = quadratic_fit(list(measured), list(measured.values()))(row["length"])
            how = " (dense extrapolated: %.0f s)" % ref
            row["dense_extrapolated_s"] = round(ref, 1)
        else:
            ref, how = None, ""
        row["speedup"] = round(ref / row["ttft_s"], 2) if ref else None
        kept = f"{row['kept_key_share']:.1%}" if "kept_key_share" in row else "all"
        table.append(f"| {row['length']} | {row['mode']} | {row['ttft_s']} s | {row['prefill_tok_s']} | "
                     f"{row['peak_rss_gib']} GiB | {row['speedup'] or '-'}x{how} | {kept} |")
    print("\n".join(table))
    print(result_line("long_prefill_ttft", preset=args.preset, dtype=args.dtype, threads=args.threads,
                      prefill_chunk=args.prefill_chunk, kv_int8=args.kv_int8, sparse_min_length=args.sparse_min_length,
                      sparse_max_keys=args.sparse_max_keys, results=rows))


def machine() -> str:
    """The CPU's model name and the threads used: what the saved measurements hold for."""
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return f"{names[0] if names else 'unknown CPU'} ({len(names)} cores)"


def save_runs(path: Path, args, rows: list[dict]) -> list[dict]:
    """Merge these runs into the measurement file `qwen25 info --context` reads (model/prefill_cost.py): runs of the same
    settings (preset, dtype, threads, chunk, KV cache, sparse budget) replace those of equal mode and length. Returns
    the earlier runs kept."""
    settings = {"preset": args.preset, "dtype": args.dtype, "threads": args.threads, "prefill_chunk": args.prefill_chunk,
                "kv_int8": args.kv_int8, "sparse": {"min_length": args.sparse_min_length,
                                                    "max_keys": args.sparse_max_keys}}
    old = json.loads(path.read_text()) if path.exists() else {}
    kept = [r for r in old.get("runs", []) if {k: old.get(k) for k in settings} == settings
            and not any((r["mode"], r["length"]) == (n["mode"], n["length"]) for n in rows)]
    data = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), **settings,
            "runs": sorted(kept + [{k: v for k, v in r.items() if k not in ("speedup", "dense_extrapolated_s")}
                                   for r in rows], key=lambda r: (r["mode"], r["length"]))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"saved {len(rows)} runs to {path} (`qwen25 info --context N --measured {path}` reads them)")
    return kept


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.5b")
    ap.add_argument("--length", type=int, default=4096, help="tokens of the long prompt")
    ap.add_argument("--chunks", default="512", help="prefill_chunk sizes to try (0: the whole prompt at once)")
    ap.add_argument("--shares", default="0,0.5", help="decode_share values to try (the server's default: 0.5)")
    ap.add_argument("--join-at", type=int, default=0,
                    help="the long prompt's first tokens already read (prefix cache): the stream meets the rest")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ttft", action="store_true", help="time to first token of one prompt, dense vs sparse")
    ap.add_argument("--lengths", default="8192,32768", help="--ttft: prompt lengths")
    ap.add_argument("--modes", default="dense,sparse", help="--ttft: dense, sparse, dense+dca, sparse+dca")
    ap.add_argument("--dense-max", type=int, default=32768, help="--ttft: longest dense prefill to run")
    ap.add_argument("--prefill-chunk", type=int, default=4096,
                    help="--ttft, --join-at: the engine's prefill_chunk for a prompt read alone")
    ap.add_argument("--sparse-min-length", type=int, default=8192)
    ap.add_argument("--sparse-max-keys", type=int, default=2048)
    ap.add_argument("--kv-int8", action="store_true", help="--ttft: the 8-bit KV cache")
    ap.add_argument("--save", default=str(prefill_cost.USER),
                    help="--ttft: merge the runs into this file, which `qwen25 info --context` reads ('' = do not save)")
    ap.add_argument("--dca-chunk", type=int, default=32768, help="--ttft, +dca modes: DCA's chunk_size (and original "
                                                                     "length)")
    ap.add_argument("--dca-local", type=int, default=4096, help="--ttft, +dca modes: DCA's local_size")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one --ttft measurement in this process
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(ttft_one(args)))
        return
    if args.ttft:
        ttft(args)
        return
    rows = contention(args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"peak resident memory {peak:.2f} GiB")
    print(result_line("long_prefill", preset=args.preset, length=args.length, join_at=args.join_at, dtype=args.dtype,
                      threads=args.threads,
                      peak_rss_gib=round(peak, 2), results=rows))


if __name__ == "__main__":
    main()
