"""The `serve` and `chat` sub-commands (registered in qwen25/cli.py). Heavy imports happen when a command runs."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..utils import add_common_flags


def add_serve_command(subparsers) -> None:
    """Register `qwen25 serve`."""
    p = subparsers.add_parser("serve", help="serve a checkpoint with an OpenAI-compatible HTTP API",
                              description="OpenAI-compatible server (/v1/chat/completions, /v1/completions, "
                                          "/v1/models, /health, /metrics) over one continuous-batching engine.")
    add_common_flags(p, model="checkpoint directory with tokenizer files")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", type=Path,
                   help="require Authorization: Bearer KEY on every route, KEY read from this file (or set "
                        "QWEN25_API_KEY; default: no key)")
    p.add_argument("--api-key", help="the key on the command line: visible to every user in the process list; "
                                     "prefer --api-key-file or QWEN25_API_KEY")
    p.add_argument("--max-body-mb", type=float, default=16, help="larger request bodies get a 413")
    p.add_argument("--served-model-name", help="the model id clients send (default: the directory name)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (engine slots)")
    p.add_argument("--max-len", type=int, help="context per sequence, prompt + output (default min(max pos, 4096))")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens prefilled per engine step, so running streams keep flowing during a long "
                        "prompt (0: whole prompts at once)")
    p.add_argument("--decode-share", type=_share, default=0.5,
                   help="while a prompt longer than --prefill-chunk is read beside running streams, the share of time "
                        "kept for their tokens (its chunks then shrink to about half a second each; shorter prompts "
                        "are read at once); 0: prefill whenever a prompt waits")
    p.add_argument("--max-prompt-tokens", type=int, help="refuse longer prompts (default: what fits --max-len)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--max-concurrent", type=int, default=64, help="requests in flight before 429")
    _model_flags(p)
    p.set_defaults(func=_cmd_serve)


def _share(text: str) -> float:
    """--decode-share: a fraction in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def add_chat_command(subparsers) -> None:
    """Register `qwen25 chat`."""
    p = subparsers.add_parser("chat", help="chat with a checkpoint in the terminal (streamed)",
                              description="Interactive chat: type a message, the reply streams. Commands: /reset, "
                                          "/system TEXT, /exit. Sampling defaults come from generation_config.json.")
    add_common_flags(p, model="checkpoint directory with tokenizer files")
    p.add_argument("--system", help="system prompt (default: the chat format's default)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest reply")
    p.add_argument("--max-len", type=int, help="context, history + reply (default min(max positions, 4096))")
    add_common_flags(p, sampling=True)
    _model_flags(p)
    p.set_defaults(func=_cmd_chat)


def add_quant_flags(p) -> None:
    """--int8, --w8a8 and --int4 (one of them), for serve, chat and generate."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--int8", action="store_true", help="weight-only int8 quantization of the linear layers")
    group.add_argument("--w8a8", action="store_true",
                       help="int8 weights, and int8 activations per block of 32 when decoding (llama.cpp's Q8_0 "
                            "scheme; needs --dtype bf16 with AVX-512 or fp32 with AVX2): faster than --int8, a little "
                            "less exact")
    group.add_argument("--int4", action="store_true",
                       help="4-bit weights (llama.cpp's Q4_0: blocks of 32 with an fp16 scale; the output layer "
                            "8-bit) and int8 decode activations: the fastest decode, with --dtype fp32 on AVX2 CPUs; "
                            "the least exact (docs/serving.md)")


def _model_flags(p) -> None:
    add_quant_flags(p)
    add_common_flags(p, dtype=True, threads=True, sparse=True)
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="compiled AVX-512 matrix-vector kernels for bf16/int8 decode where the CPU has them")
    p.add_argument("--kv-int8", action="store_true",
                   help="8-bit KV cache (one scale per token and head): a quarter of fp32's memory, half of bf16's, "
                        "for long contexts; logits move slightly (docs/long_context.md)")
    p.add_argument("--prompt-lookup", type=int, metavar="K",
                   help="prompt-lookup speculation: up to K draft tokens copied from the prompt and output, verified "
                        "in one forward (greedy: the same output; sampled: the same distribution; faster when text "
                        "is quoted or edited; "
                        "0 = off; default 4 for chat, 0 for serve, whose batches already share each forward)")


def _cmd_serve(args) -> int:
    import signal
    import threading

    import uvicorn

    from ..model.sparse import SparsePrefill
    from .server import build_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = api_key_from(args)
    app, engine = build_server(args.model, max_batch=args.max_batch, max_len=args.max_len, int8=args.int8,
                               w8a8=args.w8a8, int4=args.int4, dtype=args.dtype, threads=args.threads, kernels=args.kernels,
                               model_name=args.served_model_name, prefill_chunk=args.prefill_chunk or None,
                               decode_share=args.decode_share,
                               engine_thread=False, api_key=api_key, max_prompt_tokens=args.max_prompt_tokens,
                               max_tokens_limit=args.max_tokens_limit, max_concurrent=args.max_concurrent,
                               max_body_bytes=int(args.max_body_mb * 2**20), prompt_lookup=args.prompt_lookup or 0,
                               kv_int8=args.kv_int8, sparse_prefill=SparsePrefill.from_flags(args))
    # uvicorn serves HTTP from a thread; the engine runs here, on the main thread that loaded the model (a decode
    # step from a second thread runs ~3x slower with OpenMP: see AsyncEngine). Ctrl-C or SIGTERM end both.
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))
    http = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    http.start()
    threading.Thread(target=lambda: (http.join(), engine.stop()), name="uvicorn-watch", daemon=True).start()
    for sig in (signal.SIGINT, signal.SIGTERM):  # as uvicorn does on the main thread
        signal.signal(sig, _interrupt)
    try:
        engine.run()  # until uvicorn stops (the watcher stops the engine) or an interrupt
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(30)
    return 0 if server.started else 1


def api_key_from(args) -> str | None:
    """The server's key: --api-key-file, else QWEN25_API_KEY, else --api-key (warned: ps shows it), else none."""
    import os

    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text().strip()
        except OSError as e:
            raise SystemExit(f"--api-key-file: cannot read {args.api_key_file}: {e}") from None
        if not key:
            raise SystemExit(f"--api-key-file: {args.api_key_file} is empty")
        return key
    if os.environ.get("QWEN25_API_KEY"):
        return os.environ["QWEN25_API_KEY"]
    if args.api_key:
        logging.getLogger("qwen25.serve").warning(
            "--api-key puts the key in the process list, readable by every user of this machine; "
            "use --api-key-file or QWEN25_API_KEY")
    return args.api_key


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _cmd_chat(args) -> int:
    from .chat_cli import cmd_chat

    return cmd_chat(args)
