"""A continuous-batching generation engine on token ids.

Requests join and leave between decode steps. Every request owns one slot (row) of a preallocated KV
cache with its own length; a decode step runs one token for every running slot at once. Prompt prefixes
(e.g. a shared system prompt) are reused block by block from an LRU prefix cache. Long prompts are prefilled
in chunks of at most `prefill_chunk` tokens per step, so requests already running keep receiving tokens while
a long prompt is read (the prefill/decode interleaving vLLM calls chunked prefill); the chunks of several
prompts in one step go through one forward (rows right-padded), so the weights are read once for all of
them. With `decode_share` > 0 (the server's default 0.5), requests that are decoding beside a long prompt (longer
than one chunk) keep that share of the engine's time: a step reads some of it only once their decode steps have had
it, and then a chunk sized to cost about `prefill_stall` seconds (at least MIN_SHARED_CHUNK tokens), so a long prompt
neither stops their tokens nor adds much more than that to any one of them; prompts are then read shortest remaining
first, and short ones at once. `generate` and `stream_generate` below run a batch of prompts to completion through
it. Chat templates, stop strings and HTTP sit above this, in the server.

Prompt-lookup speculation (`prompt_lookup=k`, for requests without penalties or a grammar): when the last few
tokens of a sequence occurred before in its prompt or output, the tokens that followed them then are a draft of up
to k tokens; one forward over the last token and the draft gives the model's distribution at every draft position.
Greedy requests keep the draft up to its first disagreement with the model's choice, so the output is token for
token what plain greedy decoding gives; sampled ones keep each draft token with its probability (the standard
accept/reject rule), so every token keeps its distribution. Fewer steps where text is quoted or edited; a request
whose drafts keep failing waits longer before drafting again.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from ..model.attention import KVCache
from ..model.transformer import CausalLM
from .sampling import SamplingParams, next_token, process_logits, token_logprobs


class Constraint(Protocol):
    """What a request's output must match (generation/grammar.py's Grammar: a JSON schema, a forced tool call)."""

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the tokens that may come next."""

    def accept(self, token: int) -> None:
        """Advance past a sampled token (one `allowed` said may come)."""


FUSE_MAX_TOKENS = 16  # a step's padded tokens up to which decode rows join the prefill forward (memory-bound size)
# The fewest prompt tokens of a step beside decoding requests: below it the step's fixed costs (a weight read, attention
# over every cached key, the decode forward: ~0.35 s at 30K keys for the 0.5B shape here) outweigh its tokens' work.
MIN_SHARED_CHUNK = 16


@dataclass
class Request:
    """One generation request. `should_stop(tokens)`, asked after every token but an eos, stops it on text (a
    TextTracker: stop strings); `stop_sequences` on token ids; `constraint` restricts every token to a grammar."""

    prompt: list[int]
    params: SamplingParams
    id: str = ""
    stop_sequences: list[list[int]] = field(default_factory=list)
    should_stop: Callable[[list[int]], bool] | None = None
    constraint: Constraint | None = None


TokenLogprob = tuple[float, list[tuple[int, float]]]  # (log p of the token, [(id, log p)] of the most likely ones)


@dataclass
class StepOutput:
    """A token produced for a request; finish_reason is None while it runs, else stop/length/cancelled/error."""

    request_id: str
    token: int | None
    finish_reason: str | None = None
    error: str | None = None  # finish_reason "error": why this request (and only it) failed
    logprob: TokenLogprob | None = None  # with params.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with params.prompt_logprobs, on the first token only


class _Running:
    def __init__(self, request: Request, slot: int, device):
        self.request, self.slot, self.output = request, slot, []
        self.prefilled = 0  # prompt tokens in the cache; the request decodes once all are
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # filled chunk by chunk when asked for
        self.generator = None
        if request.params.seed is not None and not request.params.greedy:
            self.generator = torch.Generator(device=device).manual_seed(request.params.seed)
        self.lookup: NgramLookup | None = None  # prompt-lookup drafts (speculation), when the request may use them
        self.drafted = self.accepted = 0

    @property
    def unread(self) -> int:
        """Prompt tokens not yet in the cache (0: the request decodes)."""
        return len(self.request.prompt) - self.prefilled


class NgramLookup:
    """Drafts for prompt-lookup speculation: the tokens that followed the most recent earlier occurrence of the
    sequence's last n tokens (the longest n of `sizes` that occurred), kept in a dict of n-grams updated as
    tokens arrive (no search over the history)."""

    def __init__(self, tokens: list[int], sizes: tuple[int, ...] = (3, 2)):
        self.tokens, self.sizes, self.seen = [], sizes, {}
        self.follow: int | None = None  # where the draft starts in self.tokens
        self.misses = self.wait = 0  # drafts rejected at their first token in a row; steps left before drafting
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end, self.follow = len(self.tokens), None
            for n in self.sizes:
                if end < n:
                    continue
                key = tuple(self.tokens[end - n:])
                if self.follow is None and key in self.seen:
                    self.follow = self.seen[key]
                self.seen[key] = end

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that may come next (none while backing off after misses). When the earlier occurrence
        is less than k tokens back, what followed it is repeated: a loop of that period goes on."""
        if self.wait:
            self.wait -= 1
            return []
        if self.follow is None:
            return []
        period = len(self.tokens) - self.follow
        return [self.tokens[self.follow + i % period] for i in range(k)]

    def result(self, drafted: int, accepted: int) -> None:
        """A draft's outcome: after a draft rejected at its first token, wait 1, 2, 4, ... (at most 16) steps."""
        self.misses = 0 if accepted else self.misses + 1
        self.wait = min(2 ** self.misses, 16) - 1 if self.misses else 0


def _speculable(request: Request) -> bool:
    """Whether prompt-lookup drafts can be verified for this request: each token's distribution depends on its
    logits alone (no penalties over earlier tokens, no grammar), greedy or sampled."""
    p = request.params
    return (p.repetition_penalty == 1.0 and p.presence_penalty == 0 and p.frequency_penalty == 0
            and request.constraint is None)


def check_prompt(prompt: list[int], vocab_size: int) -> None:
    """A prompt the model can read: at least one token, every id inside its vocabulary."""
    if not prompt:
        raise ValueError("every prompt needs at least one token")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})")


class PrefixCache:
    """LRU store of KV blocks keyed by the hash of every token up to the block's end."""

    def __init__(self, block: int = 16, capacity_blocks: int = 256):
        self.block, self.capacity = block, capacity_blocks
        self.blocks: OrderedDict[bytes, tuple[torch.Tensor, ...]] = OrderedDict()  # KVCache.blocks of a span

    def _keys(self, tokens: list[int]):
        h = hashlib.blake2b(digest_size=16)
        for i in range(len(tokens) // self.block):
            h.update(torch.tensor(tokens[i * self.block:(i + 1) * self.block], dtype=torch.int64).numpy().tobytes())
            yield h.copy().digest()

    def lookup(self, tokens: list[int]) -> list[tuple[torch.Tensor, ...]]:
        """KV blocks for the longest cached prefix of tokens (whole blocks)."""
        found = []
        for key in self._keys(tokens):
            if key not in self.blocks:
                break
            self.blocks.move_to_end(key)
            found.append(self.blocks[key])
        return found

    def insert(self, tokens: list[int], cache: KVCache, slot: int) -> None:
        for i, key in enumerate(self._keys(tokens)):
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            span = slice(i * self.block, (i + 1) * self.block)
            self.blocks[key] = cache.blocks(slot, span)
            while len(self.blocks) > self.capacity:
                self.blocks.popitem(last=False)


class Engine:
    """Continuous batching over one model: submit requests, call step() until they finish."""

    def __init__(self, model: CausalLM, max_batch: int = 16, max_len: int | None = None,
                 vocab_limit: int | None = None, prefix_block: int = 16, prefix_capacity_blocks: int = 256,
                 prefill_chunk: int | None = 512, prompt_lookup: int = 0, kv_int8: bool = False,
                 decode_share: float = 0.0, prefill_stall: float = 0.5):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1 (or None for whole prompts), got {prefill_chunk}")
        if not 0 <= decode_share < 1:
            raise ValueError(f"decode_share must be in [0, 1) (0: prefill whenever a prompt waits), got {decode_share}")
        if not prefill_stall > 0:
            raise ValueError(f"prefill_stall must be a positive number of seconds, got {prefill_stall}")
        self.prefill_chunk, self.decode_share, self.prefill_stall = prefill_chunk, decode_share, prefill_stall
        self._window: list | None = None  # [start, decode steps, decode step time before] beside a long prompt
        self._decode_step_s: float | None = None  # how long a step that only decodes takes (its fast end)
        self._prefill_token_s: float | None = None  # the last such step's seconds per token of long prompts
        weight = model.model.embed_tokens.weight
        self.model, self.device, self.vocab_limit = model, weight.device, vocab_limit
        self.max_len = max_len or min(model.config.max_position_embeddings, 4096)
        self.cache = KVCache(model.config, max_batch, self.max_len, weight.dtype, self.device, int8=kv_int8)
        self.seen = torch.zeros(max_batch, model.config.vocab_size, dtype=torch.bool, device=self.device)
        self.prefix = PrefixCache(prefix_block, prefix_capacity_blocks) if prefix_capacity_blocks else None
        self.waiting: deque[Request] = deque()
        self.running: dict[int, _Running] = {}  # slot -> request state
        self.cancelled: set[str] = set()
        if prompt_lookup < 0:
            raise ValueError(f"prompt_lookup must be >= 0 (draft tokens; 0 = off), got {prompt_lookup}")
        self.prompt_lookup = prompt_lookup if getattr(model, "dual_chunk", None) is None else 0
        self.stats = {"prefill_tokens": 0, "prefill_forwards": 0, "reused_tokens": 0, "decode_steps": 0,
                      "generated_tokens": 0, "draft_tokens": 0, "accepted_draft_tokens": 0, "speculative_steps": 0}
        self._ids = itertools.count()

    @property
    def max_batch(self) -> int:
        return self.cache.k.shape[1]

    def submit(self, request: Request) -> str:
        """Queue a request; returns its id. Errors for prompts that cannot fit."""
        check_prompt(request.prompt, self.model.config.vocab_size)
        if request.params.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        seed = request.params.seed
        if seed is not None and not -2**63 <= seed < 2**64:
            raise ValueError(f"seed must fit 64 bits (-2^63 <= seed < 2^64), got {seed}")
        if len(request.prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(request.prompt)} tokens does not fit the engine's "
                             f"max_len {self.max_len}")
        request.id = request.id or f"req-{next(self._ids)}"
        self.waiting.append(request)
        return request.id

    def cancel(self, request_id: str) -> None:
        """Stop a request; it finishes with reason 'cancelled' at the next step."""
        self.cancelled.add(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def reset(self) -> None:
        """Drop every request, waiting or running (after a step that raised, their state is unknown)."""
        self.waiting.clear()
        self.running.clear()
        self.cancelled.clear()
        self.cache.lengths.zero_()

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Admit waiting requests into free slots, prefill (at most `prefill_chunk` prompt tokens in all), then one
        decode step for every running request whose prompt is in the cache."""
        started = time.perf_counter()
        outputs = self._drop_cancelled()
        free = [s for s in range(self.max_batch) if s not in self.running]
        while self.waiting and free:
            request = self.waiting.popleft()
            if request.id in self.cancelled:
                self.cancelled.discard(request.id)
                outputs.append(StepOutput(request.id, None, "cancelled"))
                continue
            slot = free.pop(0)
            self.running[slot] = _Running(request, slot, self.device)
            # how far this sequence may grow: YaRN with apply_only_beyond_original picks its RoPE table from it
            self.cache.extents[slot] = min(len(request.prompt) + request.params.max_new_tokens, self.max_len)
            self._reuse_prefix(slot)
        logits: dict[int, torch.Tensor] = {}
        # the requests that decode this step: prompts in the cache before this step's prefill
        decode = [s for s, r in self.running.items() if not r.unread]
        remaining = {s: r.unread for s, r in self.running.items() if r.unread}
        long = {s for s in remaining if self._long(s)}
        shared = self._shared_chunk(bool(decode and long), started)  # tokens of long prompts this step may read
        budget, chunks, shared_taken = self.prefill_chunk, [], 0
        # admission order (the oldest prompt first), or with decode_share the shortest remaining prompt first: a short
        # request is not kept waiting behind a long one (batch generation keeps the order its outputs were made in)
        for slot in sorted(remaining, key=remaining.get) if self.decode_share else remaining:
            n = remaining[slot] if budget is None else min(remaining[slot], budget)
            if shared is not None and slot in long:
                n = min(n, shared - shared_taken)
                shared_taken += max(n, 0)
            if n > 0:
                chunks.append((slot, n))
                budget = None if budget is None else budget - n
        drafts = self._drafts(decode)
        plain = [s for s in decode if s not in drafts]
        fuse = together = False
        if chunks:  # (a decode-only step skips this)
            width = max(n for _, n in chunks)
            fits = getattr(self.model, "dual_chunk", None) is None and max(
                self.running[s].prefilled for s, _ in chunks) + width <= self.max_len
            sparse = getattr(self.model, "sparse_prefill", None)
            if sparse is not None and any(sparse.applies(1, n, self.running[s].prefilled + n) for s, n in chunks):
                fits = False  # a long chunk runs alone, in its own (sparse) forward
            # small steps (a few chunk tokens, memory-bound): the decode rows ride in the prefill's forward, padded
            # to its width, so the step reads the weights once (a stream beside a long prompt keeps more of its speed)
            fuse = (bool(plain) and fits and width * (len(chunks) + len(plain)) <= FUSE_MAX_TOKENS
                    and max(int(self.cache.lengths[s]) for s in plain) + width <= self.max_len)
            together = fuse or (len(chunks) > 1 and fits)
        if together:  # several rows (plain RoPE): one forward reads the weights once
            logits.update(self._prefill_together(chunks, plain if fuse else []))
            plain = [] if fuse else plain
        else:
            for slot, n in chunks:
                if (last := self._prefill(slot, n)) is not None:
                    logits[slot] = last
        if plain:
            logits.update(self._decode(plain))
        for slot, row_logits in logits.items():
            try:
                outputs.append(self._sample(self.running[slot], row_logits))
            except Exception as e:  # this request's sampling failed (its settings): it alone ends, with the reason
                outputs.append(StepOutput(self.running[slot].request.id, None, "error", f"{type(e).__name__}: {e}"))
        if drafts:  # after the decode forward: its throw-away rows for these slots are overwritten here
            outputs += self._verify(drafts)
        finished = {out.request_id for out in outputs
                    if out.finish_reason and (out.token is not None or out.finish_reason == "error")}
        for slot in [s for s, r in self.running.items() if r.request.id in finished]:
            self._free(slot)
        self._timed(started, bool(chunks), bool(decode), shared_taken)
        return outputs

    def _long(self, slot: int) -> bool:
        """A prompt that decode_share spreads over time: longer than one chunk (short ones, a burst of chat requests,
        are read at once: the batch they join then decodes them too)."""
        return bool(self.decode_share) and self.prefill_chunk is not None and len(
            self.running[slot].request.prompt) > self.prefill_chunk

    def _shared_chunk(self, beside_decoding: bool, now: float) -> int | None:
        """The tokens of long prompts this step may read while requests decode beside them (None: no limit but
        `prefill_chunk`): none until the decoding requests' steps have had `decode_share` of the time since a long
        prompt met them, this step's chunk included (a solo decode step's time per step they got a token in: the fast
        end of decode-only steps, before the prompt came or since, whichever is faster), then about `prefill_stall`
        seconds' worth (at least MIN_SHARED_CHUNK tokens)."""
        if not beside_decoding:
            self._window = None
            return None
        if self._window is None:  # the decode step's time before the prompt came: what "solo" means in the window
            self._window = [now, 0, self._decode_step_s]
            self._prefill_token_s = None  # timed with other chunk sizes and keys: a first chunk of the minimum
        start, steps, before = self._window
        solo = min(t for t in (before, self._decode_step_s, float("inf")) if t is not None)
        n = MIN_SHARED_CHUNK if self._prefill_token_s is None else max(MIN_SHARED_CHUNK, round(
            self.prefill_stall / self._prefill_token_s))
        n = min(n, self.prefill_chunk)  # (a long prompt implies chunks)
        cost = n * (self._prefill_token_s or 0)  # so that the share holds after this step too
        if self._decode_step_s is None or steps * solo < self.decode_share * (now + cost - start):
            return 0
        return n

    def _timed(self, started: float, prefilled: bool, decoded: bool, shared_taken: int) -> None:
        """What the step cost, for _shared_chunk: per token of long prompts when it read `shared_taken` of them (the
        rest of the step included, so a step's whole cost is what prefill_stall bounds), else the decode step's time."""
        seconds = time.perf_counter() - started
        if shared_taken:
            self._prefill_token_s = seconds / shared_taken
        elif decoded and not prefilled:  # the lower envelope of decode-only steps: down at once, up by 5% of the gap
            old = self._decode_step_s
            self._decode_step_s = seconds if old is None or seconds < old else old + 0.05 * (seconds - old)
        if decoded and self._window is not None:
            self._window[1] += 1

    def _free(self, slot: int) -> None:
        del self.running[slot]
        self.cache.lengths[slot] = 0

    def _drop_cancelled(self) -> list[StepOutput]:
        outputs = []
        for slot, state in list(self.running.items()):
            if state.request.id in self.cancelled:
                self.cancelled.discard(state.request.id)
                self._free(slot)
                outputs.append(StepOutput(state.request.id, None, "cancelled"))
        return outputs

    def _reuse_prefix(self, slot: int) -> None:
        """Copy the longest cached prefix of the slot's prompt (whole blocks, never the last token) into its rows."""
        state = self.running[slot]
        if state.request.params.prompt_logprobs is not None:  # every prompt position's logits are needed
            state.prompt_logprobs = [None]  # the first token has no context to be predicted from
            self.cache.lengths[slot] = 0
            return
        reused = self.prefix.lookup(state.request.prompt[:-1]) if self.prefix else []
        for i, block in enumerate(reused):
            self.cache.put_blocks(slot, slice(i * self.prefix.block, (i + 1) * self.prefix.block), block)
        state.prefilled = len(reused) * (self.prefix.block if self.prefix else 0)
        self.cache.lengths[slot] = state.prefilled
        self.stats["reused_tokens"] += state.prefilled

    def _prefill(self, slot: int, n: int) -> torch.Tensor | None:
        """Run the next n prompt tokens of the slot into its cache; the last position's logits once the whole
        prompt is in, else None."""
        state = self.running[slot]
        prompt, start = state.request.prompt, state.prefilled
        ids = torch.tensor([prompt[start:start + n]], device=self.device)
        if state.prompt_logprobs is None:
            out = self.model(ids, cache=self.cache.at([slot], [start], n), last_only=True)
            self.stats["prefill_forwards"] += 1
            return self._prefilled(slot, n, lambda: out[0, -1])
        hidden = self.model(ids, cache=self.cache.at([slot], [start], n), return_hidden=True)
        self.stats["prefill_forwards"] += 1
        self._score_prompt(state, start, hidden[0, :n])
        return self._prefilled(slot, n, lambda: self.model.lm_head(hidden[0, n - 1]))

    def _prefill_together(self, chunks: list[tuple[int, int]], decode: list[int] = ()) -> dict[int, torch.Tensor]:
        """_prefill for several slots in one forward (rows right-padded to the longest chunk), and the decode step of
        the `decode` slots as one-token rows of the same forward; the last position's logits of each slot whose
        prompt is now complete, and of each decode slot."""
        slots, sizes = [s for s, _ in chunks] + list(decode), [n for _, n in chunks] + [1] * len(decode)
        starts = [self.running[s].prefilled for s, _ in chunks] + [int(self.cache.lengths[s]) for s in decode]
        width = max(sizes)
        ids = torch.zeros(len(slots), width, dtype=torch.long, device=self.device)
        for row, (slot, n) in enumerate(chunks):
            prompt = self.running[slot].request.prompt
            ids[row, :n] = torch.tensor(prompt[starts[row]:starts[row] + n], device=self.device)
        for row, slot in enumerate(decode, start=len(chunks)):
            ids[row, 0] = self.running[slot].output[-1]
        hidden = self.model(ids, cache=self.cache.at(slots, starts, width), return_hidden=True)
        self.stats["prefill_forwards"] += 1
        last = hidden[torch.arange(len(slots), device=self.device), torch.tensor(sizes, device=self.device) - 1]
        complete = [row for row, (slot, n) in enumerate(chunks)
                    if starts[row] + n == len(self.running[slot].request.prompt)]
        complete += list(range(len(chunks), len(slots)))
        head = self.model.lm_head(last[complete]) if complete else None
        out_logits = {}
        for row, slot in enumerate(decode, start=len(chunks)):
            self.cache.lengths[slot] += 1
            out_logits[slot] = head[complete.index(row)]
        if decode:
            self.stats["decode_steps"] += 1
        for row, (slot, n) in enumerate(chunks):
            if self.running[slot].prompt_logprobs is not None:
                self._score_prompt(self.running[slot], starts[row], hidden[row, :n])
        for row, (slot, n) in enumerate(chunks):
            out = self._prefilled(slot, n, lambda row=row: head[complete.index(row)])
            if out is not None:
                out_logits[slot] = out
        return out_logits

    def _prefilled(self, slot: int, n: int, last_logits) -> torch.Tensor | None:
        """Bookkeeping after n more prompt tokens of a slot went into the cache; last_logits() once it is whole."""
        state = self.running[slot]
        prompt, start = state.request.prompt, state.prefilled
        # A partly prefilled slot's length is where its next chunk starts: the throw-away row a decode step computes
        # for it writes there, and the next chunk overwrites it.
        state.prefilled = start + n
        self.cache.lengths[slot] = state.prefilled
        self.stats["prefill_tokens"] += n
        if state.prefilled < len(prompt):
            return None
        self.seen[slot] = False
        self.seen[slot, torch.tensor(prompt, device=self.device)] = True
        if self.prompt_lookup and _speculable(state.request):
            state.lookup = NgramLookup(prompt)
        if self.prefix:
            self.prefix.insert(prompt, self.cache, slot)
        return last_logits()

    def _score_prompt(self, state: _Running, start: int, hidden: torch.Tensor, rows: int = 64) -> None:
        """Log-probabilities of the prompt tokens that prompt positions start.. predict (hidden: (n, d)), in pieces
        of `rows` positions (fp32 log-softmax over a 152k vocabulary is 0.6 MB a position)."""
        prompt, top = state.request.prompt, state.request.params.prompt_logprobs
        targets = torch.tensor(prompt[start + 1:start + 1 + len(hidden)], device=self.device)
        for a in range(0, len(targets), rows):
            logits = self.model.lm_head(hidden[a:a + rows][:len(targets[a:a + rows])])
            picked, ids, values = token_logprobs(logits, targets[a:a + rows], top, self.vocab_limit)
            state.prompt_logprobs += [(p, list(zip(i, v))) for p, i, v in
                                      zip(picked.tolist(), ids.tolist(), values.tolist())]

    def _decode(self, slots: list[int]) -> dict[int, torch.Tensor]:
        # one batch over slots [0, n), read in place; idle slots compute a throw-away row. A prompt half read in
        # one of them would make every row attend as far as it: then the batch is these slots alone (a copy).
        rows = list(range(max(slots) + 1))
        if any(self.running[s].unread for s in rows if s in self.running):
            rows = sorted(slots)
        tokens = torch.zeros(len(rows), 1, dtype=torch.long, device=self.device)
        for row, slot in enumerate(rows):
            if slot in slots:
                tokens[row, 0] = self.running[slot].output[-1]
        logits = self.model(tokens, cache=self.cache.at(rows, self.cache.lengths[rows], 1))[:, -1]
        for slot in slots:
            self.cache.lengths[slot] += 1
        self.stats["decode_steps"] += 1
        return {slot: logits[row] for row, slot in enumerate(rows) if slot in slots}

    def _sample(self, state: _Running, logits: torch.Tensor) -> StepOutput:
        params, slot, constraint = state.request.params, state.slot, state.request.constraint
        allowed = constraint.allowed().to(self.device) if constraint is not None else None
        token = int(next_token(logits[None], params, self.seen[slot:slot + 1], state.generator, self.vocab_limit,
                               state.output, allowed))
        if constraint is not None:
            constraint.accept(token)
        return self._emit(state, token, logits)

    def _drafts(self, slots: list[int]) -> dict[int, list[int]]:
        """This step's prompt-lookup drafts of the decoding slots that have one (the others decode plainly). The
        verify forward pads every row to the longest draft: a row without room for that decodes plainly."""
        drafts = {}
        for slot in slots:
            state = self.running[slot]
            if state.lookup is None or len(state.output) < state.request.params.min_tokens:
                continue
            room = min(state.request.params.max_new_tokens - len(state.output) - 1,
                       self.max_len - int(self.cache.lengths[slot]) - 2)
            if room >= 1 and (draft := state.lookup.draft(min(self.prompt_lookup, room))):
                drafts[slot] = draft
        width = 1 + max(map(len, drafts.values()), default=0)
        return {s: d for s, d in drafts.items() if int(self.cache.lengths[s]) + width <= self.max_len - 1}

    def _verify(self, drafts: dict[int, list[int]]) -> list[StepOutput]:
        """One forward over each slot's last token and its draft (rows right-padded). Greedy: each slot keeps the
        model's tokens up to the first that differs from the draft (plain greedy decoding's output). Sampling: the
        standard accept/reject rule for a draft that is certain (a lookup draft: q = 1 on its token): draft token d
        is kept with probability p(d); the first rejected one is replaced by a sample of p without d, renormalised;
        after a whole draft, one more token from p. Each token then has exactly the distribution p."""
        slots = list(drafts)
        width = 1 + max(map(len, drafts.values()))
        ids = torch.zeros(len(slots), width, dtype=torch.long, device=self.device)
        for row, slot in enumerate(slots):
            ids[row, :1 + len(drafts[slot])] = torch.tensor([self.running[slot].output[-1]] + drafts[slot])
        starts = self.cache.lengths[slots].clone()
        logits = self.model(ids, cache=self.cache.at(slots, starts, width))
        self.stats["speculative_steps"] += 1
        outputs = []
        for row, slot in enumerate(slots):
            state, draft = self.running[slot], drafts[slot]
            emitted = 0
            for i in range(len(draft) + 1):
                try:
                    token = self._speculative_token(state, logits[row, i], draft[i] if i < len(draft) else None)
                    out = self._emit(state, token, logits[row, i], cache_length=int(starts[row]) + i + 1)
                except Exception as e:  # as in step(): this request alone ends
                    out = StepOutput(state.request.id, None, "error", f"{type(e).__name__}: {e}")
                outputs.append(out)
                emitted += out.token is not None
                if out.finish_reason or i == len(draft) or token != draft[i]:
                    break
            self.cache.lengths[slot] = starts[row] + emitted  # the inputs whose keys hold: last token + accepted
            accepted = max(emitted - 1, 0)
            state.drafted, state.accepted = state.drafted + len(draft), state.accepted + accepted
            self.stats["draft_tokens"] += len(draft)
            self.stats["accepted_draft_tokens"] += accepted
            if state.lookup is not None:
                state.lookup.result(len(draft), accepted)
            if outputs[-1].finish_reason:
                self._free(slot)
        return outputs

    def _speculative_token(self, state: _Running, logits: torch.Tensor, drafted: int | None) -> int:
        """The token at a verified position: the draft's (drafted) if kept, else the model's own pick."""
        params = state.request.params
        if params.greedy:
            return int(next_token(logits[None], params, vocab_limit=self.vocab_limit))
        probs = process_logits(logits[None], params, vocab_limit=self.vocab_limit).softmax(-1)[0]
        if drafted is not None:
            keep = torch.rand((), generator=state.generator, device=self.device) < probs[drafted]
            if keep:
                return drafted
            probs = probs.clone()
            probs[drafted] = 0  # the residual max(p - q, 0) of a certain draft, renormalised by multinomial
            if not probs.sum() > 0:
                return drafted  # p was all on the draft token (then it is never rejected; float safety)
        return int(torch.multinomial(probs, 1, generator=state.generator))

    def _emit(self, state: _Running, token: int, logits: torch.Tensor, cache_length: int | None = None) -> StepOutput:
        """Record a token picked for a request from `logits` (its row): log-probabilities, stop checks."""
        params, slot = state.request.params, state.slot
        logprob = None
        if params.logprobs is not None:
            picked, ids, values = token_logprobs(logits[None], torch.tensor([token], device=self.device),
                                                 params.logprobs, self.vocab_limit)
            logprob = (float(picked[0]), list(zip(ids[0].tolist(), values[0].tolist())))
        if state.lookup is not None:
            state.lookup.extend([token])
        state.output.append(token)
        self.seen[slot, token] = True
        self.stats["generated_tokens"] += 1
        reason = None
        out = state.output
        if token in params.eos_token_ids or any(out[-len(s):] == s for s in state.request.stop_sequences if s):
            reason = "stop"
        elif state.request.should_stop is not None and state.request.should_stop(out):
            reason = "stop"
        elif len(out) >= params.max_new_tokens or (
                cache_length if cache_length is not None else int(self.cache.lengths[slot])) + 1 >= self.max_len:
            reason = "length"
        prompt_logprobs, state.prompt_logprobs = state.prompt_logprobs, None
        return StepOutput(state.request.id, token, reason, logprob=logprob, prompt_logprobs=prompt_logprobs)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion (continuous batching when there are more prompts than slots). With a prefix
        cache, the copies of a prompt (a GRPO group, rejection sampling's k samples) wait until the first copy's
        prompt is in the cache and then reuse its blocks: a shared prompt is prefilled once."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        requests = [Request(list(p), q, id=f"generate-{i}") for i, (p, q) in enumerate(zip(prompts, params))]
        first: dict[tuple[int, ...], str] = {}  # prompt -> the id of its first copy
        waiting: dict[str, list[Request]] = {}  # first copy's id -> the copies submitted once it has a token
        for r in requests:
            key = tuple(r.prompt)
            if self.prefix and len(r.prompt) > self.prefix.block and key in first:
                waiting[first[key]].append(r)
            else:
                first.setdefault(key, r.id)
                waiting.setdefault(self.submit(r), [])
        results: dict[str, list[int]] = {r.id: [] for r in requests}
        while self.has_work():
            for out in self.step():
                if out.token is not None and out.request_id in results:
                    results[out.request_id].append(out.token)
                for r in waiting.pop(out.request_id, []):  # its prompt is cached (or it failed: they run anyway)
                    self.submit(r)
        return [results[r.id] for r in requests]


@torch.inference_mode()
def stream_generate(model: CausalLM, prompts: list[list[int]], params: SamplingParams,
                    vocab_limit: int | None = None, should_stop: list[Callable[[list[int]], bool]] | None = None,
                    kv_int8: bool = False) -> Iterator[list[int | None]]:
    """Yield, at every engine step, the new token of each prompt (None where it has none: it has finished).

    A prompt finishes after yielding one of params.eos_token_ids, after params.max_new_tokens tokens, or once its
    should_stop (e.g. a TextTracker for stop strings) says so. The prompts run as the Engine's requests, one slot
    each (no padding); with a seed, prompt i samples with seed + i.
    """
    if not prompts:
        raise ValueError("every prompt needs at least one token")
    for prompt in prompts:  # before the early return: a bad prompt is refused even when nothing is generated
        check_prompt(prompt, model.config.vocab_size)
    if params.max_new_tokens == 0:
        return
    engine = Engine(model, max_batch=len(prompts), max_len=max(map(len, prompts)) + params.max_new_tokens,
                    vocab_limit=vocab_limit, prefix_capacity_blocks=0, prefill_chunk=None, kv_int8=kv_int8)
    row = {}
    for i, prompt in enumerate(prompts):
        seeded = params if params.seed is None or i == 0 else replace(params, seed=(params.seed + i) % 2**64)
        row[engine.submit(Request(list(prompt), seeded, should_stop=should_stop[i] if should_stop else None))] = i
    while engine.has_work():
        step: list[int | None] = [None] * len(prompts)
        for out in engine.step():
            if out.error:
                raise ValueError(f"generation failed: {out.error}")
            step[row[out.request_id]] = out.token
        yield step


def generate(model: CausalLM, prompts: list[list[int]], params: SamplingParams,
             vocab_limit: int | None = None, kv_int8: bool = False) -> list[list[int]]:
    """New tokens for each prompt (an eos token that ended a sequence is included, as in transformers); kv_int8:
    the 8-bit KV cache."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream_generate(model, prompts, params, vocab_limit, kv_int8=kv_int8):
        for tokens, token in zip(out, step):
            if token is not None:
                tokens.append(token)
    return out
