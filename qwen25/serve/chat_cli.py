"""`qwen25 chat --model DIR`: an interactive chat in the terminal, streamed token by token.

Each line typed is a user message; the reply streams as it is generated. The whole history is sent every turn
(as the chat format requires); the engine's prefix cache reuses the KV of the part already seen, so a long
conversation does not re-run its prefix. Commands: /reset (forget the history), /system TEXT (a new system
prompt, and a fresh conversation), /exit (or end of input).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import TextIO

from ..generation import Engine, Request, SamplingParams
from ..tokenizer import encode_chat
from ..utils import apply_threads

HELP = "commands: /reset  /system TEXT  /exit"


class ChatSession:
    """A conversation over one engine: history, system prompt and a streamed reply per user message."""

    def __init__(self, engine: Engine, tokenizer, params: SamplingParams, system: str | None = None):
        self.engine, self.tokenizer, self.params, self.system = engine, tokenizer, params, system
        self.history: list[dict] = []
        self.last_prompt: list[int] = []
        self.stop_ids = set(params.eos_token_ids)
        for name in ("im_end_id", "endoftext_id"):
            try:
                self.stop_ids.add(getattr(tokenizer, name))
            except Exception:  # a tokenizer without that control token
                pass

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reply(self, text: str, out: TextIO) -> tuple[str, int, float]:
        """Add a user message, stream the assistant's answer to `out`; returns (answer, tokens, seconds).
        Ctrl-C stops the answer where it is (it is kept in the history as far as it got)."""
        self.history.append({"role": "user", "content": text})
        prompt = encode_chat(self.tokenizer, self.messages(), add_generation_prompt=True, sanitize=True).ids
        room = self.engine.max_len - len(prompt)
        if room < 1:
            self.history.pop()
            raise ValueError(f"the conversation ({len(prompt)} tokens) no longer fits the context of "
                             f"{self.engine.max_len}: /reset to start again")
        params = dataclasses.replace(self.params, eos_token_ids=sorted(self.stop_ids),
                                     max_new_tokens=min(self.params.max_new_tokens, room))
        self.last_prompt = prompt
        rid = self.engine.submit(Request(prompt, params))
        decoder = self.tokenizer.decode_stream(skip_special_tokens=True)
        pieces, tokens, start = [], 0, time.perf_counter()
        try:
            while self.engine.has_work():
                for step in self.engine.step():
                    if step.request_id != rid or step.token is None:
                        continue
                    tokens += 1
                    piece = decoder.step(step.token)
                    pieces.append(piece)
                    out.write(piece)
                    out.flush()
        except KeyboardInterrupt:
            self.engine.cancel(rid)
            while self.engine.has_work():  # let the engine drop the request and free its slot
                self.engine.step()
        pieces.append(decoder.flush())
        out.write(pieces[-1] + "\n")
        answer = "".join(pieces)
        self.history.append({"role": "assistant", "content": answer})
        return answer, tokens, time.perf_counter() - start

    def reset(self, system: str | None = None, keep_system: bool = True) -> None:
        self.history = []
        if not keep_system:
            self.system = system


def run_chat(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO, prompt: str = ">>> ") -> int:
    """The read-reply loop over text streams (the terminal, or pipes in tests)."""
    print(f"qwen25 chat ({HELP})", file=stderr)
    while True:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            stdout.write("\n")
            return 0
        text = line.rstrip("\n")
        command, _, rest = text.strip().partition(" ")
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            session.reset()
            print("[history cleared]", file=stderr)
            continue
        if command == "/system":
            session.reset(rest.strip() or None, keep_system=False)
            print(f"[system prompt {'set' if rest.strip() else 'cleared'}; history cleared]", file=stderr)
            continue
        if command.startswith("/"):
            print(f"unknown command {command!r} ({HELP})", file=stderr)
            continue
        if not text.strip():
            continue
        try:
            _, tokens, seconds = session.reply(text, stdout)
        except ValueError as e:
            print(f"error: {e}", file=stderr)
            continue
        print(f"[{tokens} tokens, {tokens / max(seconds, 1e-9):.1f} tokens/s]", file=stderr)


def cmd_chat(args) -> int:
    """Load the checkpoint and tokenizer, then chat on the terminal."""

    from ..model import load_model
    from ..tokenizer import Tokenizer
    from ..model.sparse import SparsePrefill
    from .quant import prepare_for_decode

    apply_threads(args)
    tokenizer = Tokenizer.from_dir(args.model)
    model = load_model(args.model, dtype=args.dtype)
    prepare_for_decode(model, int8=args.int8, w8a8=args.w8a8, int4=args.int4, kernels=args.kernels)
    model.sparse_prefill = SparsePrefill.from_flags(args)
    params = SamplingParams.from_flags(args, model.config.eos_token_ids)
    engine = Engine(model, max_batch=1, max_len=args.max_len, vocab_limit=len(tokenizer),
                    prompt_lookup=4 if args.prompt_lookup is None else args.prompt_lookup, kv_int8=args.kv_int8)
    session = ChatSession(engine, tokenizer, params, system=args.system)
    return run_chat(session, sys.stdin, sys.stdout, sys.stderr, prompt=">>> " if sys.stdin.isatty() else "")
