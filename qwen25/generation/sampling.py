"""Sampling: the settings of a request (SamplingParams) and the pure functions that pick each next token."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

# Qwen2.5-Instruct's sampling settings (its generation_config.json): the one place they are written down.
QWEN_INSTRUCT_DEFAULTS = dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)


@dataclass
class SamplingParams:
    """How to pick each next token. Temperature 0 (the default) is greedy decoding: the one signal for it."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 128
    eos_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    # OpenAI's and vLLM's further settings (the server's fields of the same names)
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (after temperature)
    presence_penalty: float = 0.0  # subtracted once from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted per occurrence of a token generated so far
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to a token's logit; -100 bans it
    min_tokens: int = 0  # eos cannot end the sequence before this many tokens
    logprobs: int | None = None  # report each generated token's log-probability and this many top alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token but the first (the prompt is then
    # prefilled from scratch: a reused prefix has no logits)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if isinstance(self.eos_token_ids, int):
            self.eos_token_ids = [self.eos_token_ids]
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (or None), got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def do_sample(self) -> bool:
        """transformers' name for not greedy (generation_config.json)."""
        return not self.greedy

    @classmethod
    def from_checkpoint(cls, directory: str | Path, eos_token_ids: list[int] | None = None, **overrides):
        """Settings from a checkpoint's generation_config.json (if present), then `overrides` (None = keep): the
        CLI's flags. As in transformers, do_sample false (or absent) means greedy whatever the temperature; true
        samples at the given temperature (1.0 if none)."""
        path = Path(directory) / "generation_config.json"
        raw = json.loads(path.read_text()) if path.is_file() else {}
        settings = {k: v for k, v in raw.items() if v is not None}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in settings.items() if k in names}
        values["temperature"] = values.get("temperature", 1.0) if settings.get("do_sample") else 0.0
        eos = raw.get("eos_token_id", eos_token_ids)
        if eos is not None:
            values.setdefault("eos_token_ids", [eos] if isinstance(eos, int) else list(eos))
        return cls(**values)

    @classmethod
    def from_flags(cls, args, eos_token_ids: list[int] | None = None) -> SamplingParams:
        """The settings a command line asks for (utils.add_common_flags(sampling=True), --max-new-tokens) over the
        checkpoint's generation_config.json (`args.model`)."""
        return cls.from_checkpoint(args.model, eos_token_ids=eos_token_ids, do_sample=args.sample,
                                   **{k: getattr(args, k, None) for k in ("temperature", "top_k", "top_p",
                                                                           "repetition_penalty", "max_new_tokens",
                                                                           "seed")})

    def to_generation_config(self) -> dict:
        """The generation_config.json dictionary for these settings (transformers' do_sample switch included)."""
        out = {"do_sample": self.do_sample, **{k: v for k, v in asdict(self).items()
                                               if k in _GENERATION_CONFIG_KEYS}}
        if self.greedy:  # transformers warns about sampling settings beside do_sample false
            out = {k: v for k, v in out.items() if k in ("do_sample", "repetition_penalty")}
        if self.eos_token_ids:
            out["eos_token_id"] = self.eos_token_ids if len(self.eos_token_ids) > 1 else self.eos_token_ids[0]
        return out


_GENERATION_CONFIG_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty")


# ---- logits processing (pure functions on (batch, vocab) float tensors) ---------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already present (`seen`: (batch, vocab) bool): divide positive logits
    by the penalty, multiply negative ones."""
    if penalty == 1.0:
        return logits
    if logits.device.type != "cpu":  # accelerators: whole-vocabulary ops, no host sync (nonzero would need one)
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        return torch.where(seen, penalised, logits)
    rows, cols = seen.nonzero(as_tuple=True)  # CPU: only the few hundred seen tokens, not the whole vocabulary
    picked = logits[rows, cols]
    out = logits.clone()
    out[rows, cols] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return out


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th kept); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= 1 - p
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's (vLLM's min_p)."""
    if min_p <= 0:
        return logits
    threshold = logits.amax(dim=-1, keepdim=True) + math.log(min_p)  # p < min_p * p_max  <=>  l < l_max + log min_p
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_presence_frequency(logits: torch.Tensor, generated: list[int], presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's penalties on one row: minus presence for every token generated so far, minus frequency per time."""
    if not generated or (presence == 0 and frequency == 0):
        return logits
    ids, counts = torch.tensor(generated, device=logits.device).unique(return_counts=True)
    out = logits.clone()
    out[:, ids] -= presence + frequency * counts.to(logits.dtype)
    return out


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                   vocab_limit: int | None = None, generated: list[int] | None = None,
                   allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The logits a token is picked from: the padding-vocabulary mask, logit_bias, `allowed` (bool, a grammar's
    tokens), eos held back before min_tokens, the repetition, presence and frequency penalties, then (when
    sampling) temperature, top-k, top-p and min-p. `generated` (one row: its tokens so far) feeds the OpenAI
    penalties and min_tokens."""
    as_float = logits.float()
    if as_float is logits:  # already fp32: never write into the caller's tensor
        as_float = as_float.clone()
    logits = as_float
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = float("-inf")  # embedding rows past the tokenizer are padding
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        logits[:, ids] += torch.tensor(list(params.logit_bias.values()), device=logits.device)
    if allowed is not None:
        logits[:, :allowed.shape[-1]].masked_fill_(~allowed, float("-inf"))
    if params.min_tokens and generated is not None and len(generated) < params.min_tokens and params.eos_token_ids:
        logits[:, params.eos_token_ids] = float("-inf")
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if generated is not None:
        logits = apply_presence_frequency(logits, generated, params.presence_penalty, params.frequency_penalty)
    if params.greedy:
        return logits
    scaled = logits / params.temperature
    if not torch.isfinite(scaled.amax(dim=-1)).all():  # a tiny temperature overflowed the largest logit: the same
        # distribution from logits shifted to a maximum of 0 (the rest -> -inf: greedy, ties shared), never NaN
        scaled = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature
    return apply_min_p(apply_top_p(apply_top_k(scaled, params.top_k), params.top_p), params.min_p)


def next_token(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
               generator: torch.Generator | None = None, vocab_limit: int | None = None,
               generated: list[int] | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Pick one token per row from (batch, vocab) logits."""
    logits = process_logits(logits, params, seen, vocab_limit, generated, allowed)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, top: int = 0,
                   vocab_limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's log-probabilities (fp32 log-softmax over the whole row, as the eval harness scores) of
    `targets` (N,) under (N, vocab) logits, and each row's `top` most likely ids below vocab_limit with theirs:
    ((N,), (N, top) ids, (N, top) log-probabilities)."""
    logprobs = logits.float().log_softmax(dim=-1)
    picked = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    values, ids = logprobs[:, :vocab_limit].topk(top, dim=-1) if top else (logprobs[:, :0], targets[:, None][:, :0])
    return picked, ids, values


def tokenizer_vocab_size(directory: str | Path) -> int | None:
    """Number of token ids a checkpoint's tokenizer files define (embedding rows past it are padding)."""
    directory = Path(directory)
    ids: list[int] = []
    tok = directory / "tokenizer.json"
    if tok.is_file():
        data = json.loads(tok.read_text(encoding="utf-8"))
        ids += list((data.get("model") or {}).get("vocab", {}).values())
        ids += [t["id"] for t in data.get("added_tokens", [])]
    elif (directory / "vocab.json").is_file():
        ids += list(json.loads((directory / "vocab.json").read_text(encoding="utf-8")).values())
        cfg = directory / "tokenizer_config.json"
        if cfg.is_file():
            ids += [int(i) for i in json.loads(cfg.read_text(encoding="utf-8")).get("added_tokens_decoder", {})]
    return max(ids) + 1 if ids else None
