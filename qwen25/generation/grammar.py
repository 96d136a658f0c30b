"""Constrained decoding: a request's output held to a grammar (a JSON schema, forced tool calls) with llguidance.

llguidance (the Rust library behind Guidance, also used by vLLM and SGLang) was picked over xgrammar and
outlines-core for its fit here: a wheel with no dependencies (xgrammar pulls triton and a TVM runtime), a token
mask computed lazily in tens of microseconds per step on the CPU without a precompilation pass per schema, and
JSON schemas, Lark and special tokens in one grammar language, which forced tool calls need
(`<tool_call>` is a token of its own). It reads our tokenizer from its tokenizer.json.

A `Grammar` is the engine's `Constraint` for one request: `allowed()` before each token, `accept(token)` after.
Once the grammar is complete only an end-of-sequence token is allowed, so the request ends there.
"""

from __future__ import annotations

import json
import threading

import torch

from ..tokenizer.files import tokenizer_json

# JSON as Python's json.dumps writes it (and as Qwen writes tool calls): ", " and ": ", no other whitespace. A
# flexible-whitespace grammar lets a weak model fill its whole budget with blank lines.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot compile (the server answers 400 with the message)."""


class Grammars:
    """Compiles grammars for one tokenizer and model vocabulary; the llguidance tokenizer is built on first use
    (about 2 s for Qwen's 151k tokens) and shared by every request."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]):
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, list(eos_token_ids)
        self._lltokenizer = None
        self._lock = threading.Lock()

    @property
    def lltokenizer(self):
        import llguidance

        with self._lock:
            if self._lltokenizer is None:
                self._lltokenizer = llguidance.LLTokenizer(json.dumps(tokenizer_json(self.tokenizer.vocab)),
                                                           n_vocab=self.vocab_size, eos_token=self.eos_token_ids)
        return self._lltokenizer

    def json_schema(self, schema: dict) -> Grammar:
        """Output that is one JSON value valid under `schema` ({"type": "object"}: any object)."""
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return self.lark(f"start: {_json_rule(schema)}")

    def tool_calls(self, tools: list[dict], name: str | None = None, or_schema: dict | None = None) -> Grammar:
        """Qwen's tool-call blocks, `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, with arguments
        valid under the function's parameters: one call of `name`, or (name None) one or more calls of any tool;
        or_schema: or else a JSON reply valid under that schema (structured output beside tools left to choose)."""
        functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
        if not functions:
            raise GrammarError(f"tool_choice names the function {name!r}, which is not in tools")
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                  "properties": {"name": {"const": f["name"]},
                                 "arguments": f.get("parameters") or {"type": "object"}}} for f in functions]
        start, end = (f"<[{self.tokenizer.token_to_id(t)}]>" for t in ("<tool_call>", "</tool_call>"))
        rule = _json_rule(calls[0] if len(calls) == 1 else {"anyOf": calls})
        many = "" if name is not None else ' ("\\n" call)*'
        reply = f" | {_json_rule(or_schema)}" if or_schema is not None else ""
        return self.lark(f'start: call{many}{reply}\ncall: {start} "\\n" {rule} "\\n" {end}')

    def lark(self, grammar: str) -> Grammar:
        """A grammar in llguidance's Lark dialect (`%json {...}` for a schema, `<[id]>` for a token)."""
        import llguidance

        compiled = llguidance.LLMatcher.grammar_from_lark(grammar)
        error = llguidance.LLMatcher.validate_grammar(compiled, self.lltokenizer)
        if error:
            raise GrammarError(f"the grammar does not compile: {error}")
        return Grammar(llguidance.LLMatcher(self.lltokenizer, compiled, log_level=0), self.vocab_size)


def _json_rule(schema: dict) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_STYLE})


class Grammar:
    """One request's place in its grammar: the engine's Constraint."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size
        self._bits = torch.full(((vocab_size + 31) // 32,), -1, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the tokens the grammar lets come next."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        self._check()
        return ((self._bits[:, None] >> _SHIFTS) & 1).bool().flatten()[:self.vocab_size]

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise RuntimeError(f"grammar: {self.matcher.get_error()}")
