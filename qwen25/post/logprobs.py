"""Log-probabilities of completions, and the right-padded batches every post-training stage feeds the model.

All stages score sequences laid out the same way: one row per sequence, prompt then completion, right-padded.
With right padding a causal model never lets a real token see a pad (pads come after it), so no attention mask
is needed and positions are the plain 0..T-1. `completion_mask` (B, T) marks the tokens whose probability counts
(the assistant's tokens); position t of the logits predicts token t + 1, so per-token results have T - 1 columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tokenizer.chat import encode_chat


@dataclass
class Batch:
    """Right-padded sequences: input_ids (B, T) long, completion_mask (B, T) float, lengths (B,) long."""

    input_ids: torch.Tensor
    completion_mask: torch.Tensor
    lengths: torch.Tensor

    def to(self, device) -> Batch:
        """The same batch on `device`."""
        return Batch(self.input_ids.to(device), self.completion_mask.to(device), self.lengths.to(device))

    @property
    def target_mask(self) -> torch.Tensor:
        """(B, T - 1): 1 where the next token is a completion token (aligned with token_logprobs' output)."""
        return self.completion_mask[:, 1:]


def pad_batch(sequences: list[list[int]], masks: list[list[int]], pad_id: int = 0) -> Batch:
    """Right-pad token lists and their completion masks (1 = scored) into one Batch."""
    if len(sequences) != len(masks):
        raise ValueError(f"{len(sequences)} sequences but {len(masks)} masks")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width)
    for i, (seq, m) in enumerate(zip(sequences, masks)):
        if len(seq) != len(m):
            raise ValueError(f"sequence {i}: {len(seq)} tokens but a mask of {len(m)}")
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.float)
    return Batch(ids, mask, torch.tensor([len(s) for s in sequences]))


def prompt_completion_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int = 0) -> Batch:
    """Rows of prompt + completion with the completion marked: the layout of DPO pairs and GRPO rollouts."""
    return pad_batch([p + c for p, c in zip(prompts, completions)],
                     [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)], pad_id)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[target] for every position, in fp32: (B, T, V), (B, T) -> (B, T).

    Computed as logit - logsumexp one row at a time, so at most one row of fp32 logits exists besides the input
    (bf16 logits are upcast row by row: a bf16 log-softmax would be off by ~0.1 nats at a 150k vocabulary).
    """
    rows = []
    for row_logits, row_targets in zip(logits, targets):
        row_logits = row_logits.float()
        if temperature != 1.0:
            row_logits = row_logits / temperature
        picked = row_logits.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def model_token_logprobs(model, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """(B, T - 1) log-probabilities of tokens 1..T-1 of each row under `model` (zero outside the completion)."""
    batch = batch.to(next(model.parameters()).device)
    logits = model(batch.input_ids[:, :-1])
    return token_logprobs(logits, batch.input_ids[:, 1:], temperature) * batch.target_mask


def sequence_logprobs(model, batch: Batch) -> torch.Tensor:
    """(B,) log pi(completion | prompt): per-token log-probabilities summed over the completion tokens."""
    return model_token_logprobs(model, batch).sum(-1)


def sampling_vocab_limit(vocab_limit: int | None, tokenizer) -> int | None:
    """The ids sampling may produce: the configured limit, else the tokenizer's size (an embedding is often padded
    past the vocabulary, and a padding id cannot be decoded)."""
    if vocab_limit is not None or tokenizer is None or not hasattr(tokenizer, "__len__"):
        return vocab_limit
    return len(tokenizer)


def strip_eos(ids: list[int], eos_ids) -> list[int]:
    """A completion without its final end-of-turn token (what a verifier should read)."""
    return ids[:-1] if ids and ids[-1] in eos_ids else ids


def _messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def is_chat_prompt(example: dict, chat: bool = True) -> bool:
    """Whether the example's prompt is rendered as a chat: messages always, a string when `chat` (a user turn)."""
    return "prompt_ids" not in example and (not isinstance(example.get("prompt"), str) or chat)


def encode_prompt(example: dict, tokenizer=None, chat: bool = True) -> list[int]:
    """The prompt's token ids: "prompt_ids"; chat "prompt" (messages, or text as a user turn) ending with the
    assistant header; or, with chat=False, a text prompt encoded as it is (base-model tasks, few-shot text)."""
    if "prompt_ids" in example:
        return list(example["prompt_ids"])
    if tokenizer is None:
        raise ValueError("text prompts need a tokenizer (or give prompt_ids)")
    if not is_chat_prompt(example, chat):
        return tokenizer.encode(example["prompt"])
    return encode_chat(tokenizer, _messages(example["prompt"]), example.get("tools"), add_generation_prompt=True).ids


def encode_completion(example: dict, key: str, tokenizer=None) -> tuple[list[int], list[int]]:
    """(ids, completion mask) of prompt + the `key` response: "<key>_ids", or chat text (the final assistant turn).

    Chat responses are rendered as a whole conversation, so the ids are exactly what SFT and generation see;
    the mask covers the last assistant turn only (its text and closing <|im_end|>\\n, as in TRL's template).
    """
    if f"{key}_ids" in example:
        prompt, completion = list(example["prompt_ids"]), list(example[f"{key}_ids"])
        return prompt + completion, [0] * len(prompt) + [1] * len(completion)
    if tokenizer is None:
        raise ValueError(f"chat pairs need a tokenizer (or give prompt_ids and {key}_ids)")
    response = example[key]
    turn = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
    enc = encode_chat(tokenizer, _messages(example["prompt"]) + turn, example.get("tools"))
    mask = list(enc.assistant_mask)
    if 1 not in mask:
        raise ValueError(f"the {key!r} response rendered no assistant tokens")
    first = max(i for i in range(len(mask)) if mask[i] == 1 and (i == 0 or mask[i - 1] == 0))  # last run's start
    return enc.ids, [0] * first + mask[first:]


def encode_pair(example: dict, tokenizer=None) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """((chosen ids, mask), (rejected ids, mask)) of a preference pair (chat or pre-tokenized)."""
    return encode_completion(example, "chosen", tokenizer), encode_completion(example, "rejected", tokenizer)


def pair_batch(pairs: list[tuple], pad_id: int = 0) -> Batch:
    """One right-padded batch of encoded pairs: all chosen rows first, then all rejected rows (TRL's layout)."""
    rows = [c for c, _ in pairs] + [r for _, r in pairs]
    return pad_batch([ids for ids, _ in rows], [m for _, m in rows], pad_id)
