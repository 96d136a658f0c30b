"""Supervised fine-tuning: chat data, loss on the assistant's tokens only, packed rows with per-document masking.

An example is {"messages": [...], "tools": [...]?} (rendered with our ChatML format, qwen25.tokenizer.chat, whose
assistant mask equals TRL's qwen2_5_training template), or already tokenized {"input_ids": [...],
"assistant_mask": [...]}. Examples are packed several to a row of `seq_len` tokens; attention never crosses an
example and positions restart in each (qwen25.train.packing), so an example's loss does not depend on its
neighbours. The loss is the mean cross entropy over every assistant target token of the batch (TRL's
normalisation: tokens, not sequences). Defaults are the report's recipe: lr 7e-6 decayed to 7e-7, weight decay
0.1, clip 1.0, 2 epochs; long-context SFT is the same stage run twice (phase 1 seq_len 32,768, phase 2 mixing
short and long data up to 262,144, starting from phase 1's `final/`), see docs/post_training.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..tokenizer.chat import encode_chat
from ..train.packing import document_mask, document_positions
from .logprobs import Batch, pad_batch
from .runner import StageConfig, adamw, autocast, example_indices, load_causal_lm, run_stage_steps


@dataclass
class SFTConfig(StageConfig):
    """SFT options: the shared ones plus the packed row length."""

    seq_len: int = 32768
    pad_id: int = 0
    # False: one example per row, padded per batch and plain causal attention (no (T, T) document mask), for
    # long-context SFT where a dense mask over 262k tokens cannot be held in memory.
    pack: bool = True


def encode_sft_example(example: dict, tokenizer=None) -> tuple[list[int], list[int]]:
    """(token ids, assistant mask) of one example: pre-tokenized, or chat messages rendered and encoded."""
    if "input_ids" in example:
        ids, mask = list(example["input_ids"]), list(example.get("assistant_mask", [1] * len(example["input_ids"])))
        if len(ids) != len(mask):
            raise ValueError(f"example has {len(ids)} input_ids but an assistant_mask of {len(mask)}")
        return ids, mask
    if "messages" not in example:
        raise ValueError(f"an SFT example needs 'messages' or 'input_ids', got keys {sorted(example)}")
    if tokenizer is None:
        raise ValueError("chat examples need a tokenizer (set `tokenizer:` or use a model directory that has one)")
    enc = encode_chat(tokenizer, example["messages"], example.get("tools"))
    if not any(enc.assistant_mask):
        raise ValueError("an SFT example has no assistant turn: nothing to train on")
    return enc.ids, enc.assistant_mask


def pack(encoded: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int = 0):
    """Greedily pack (ids, mask) examples into rows of seq_len tokens (longer ones are cut to seq_len; one left
    with no assistant token after the cut is dropped, with a warning).

    Returns (tokens, assistant_mask, doc_ids), each (rows, seq_len); padding has mask 0 and its own doc id.
    """
    rows: list[list[tuple[list[int], list[int]]]] = []
    used: list[int] = []
    dropped = 0
    for ids, mask in encoded:
        ids, mask = ids[:seq_len], mask[:seq_len]
        if not any(mask[1:]):  # nothing left to predict: the assistant's reply lay past seq_len
            dropped += 1
            continue
        for r, n in enumerate(used):  # first row with room: keeps rows full without reordering much
            if n + len(ids) <= seq_len:
                rows[r].append((ids, mask))
                used[r] += len(ids)
                break
        else:
            rows.append([(ids, mask)])
            used.append(len(ids))
    if not rows:
        raise ValueError(f"no SFT example has an assistant token within seq_len={seq_len}")
    if dropped:
        warnings.warn(f"SFT packing: {dropped} example(s) have no assistant token within seq_len={seq_len}; dropped")
    tokens = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    masks = torch.zeros(len(rows), seq_len)
    docs = torch.zeros(len(rows), seq_len, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, (ids, mask) in enumerate(row):
            tokens[r, at:at + len(ids)] = torch.tensor(ids)
            masks[r, at:at + len(ids)] = torch.tensor(mask, dtype=torch.float)
            docs[r, at:at + len(ids)] = d
            at += len(ids)
        docs[r, at:] = len(row)  # padding: a document of its own, never a target
    return tokens, masks, docs


def sft_target_mask(assistant_mask: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T - 1): 1 where position t's target (token t + 1) is an assistant token of the same document."""
    mask = assistant_mask[:, 1:].float()
    if doc_ids is not None:
        mask = mask * (doc_ids[:, 1:] == doc_ids[:, :-1]).float()
    return mask


def sft_loss(logits: torch.Tensor, tokens: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over the targets where target_mask is 1.

    logits (B, T - 1, V) from tokens[:, :-1]; tokens (B, T); target_mask (B, T - 1). Equals TRL's SFT loss with
    assistant_only_loss (labels -100 off the assistant's tokens, mean over the remaining labels).
    """
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
    count = target_mask.sum()
    if count == 0:
        raise ValueError("the batch has no assistant tokens to train on")
    return (ce * target_mask.reshape(-1)).sum() / count


def packed_loss(model, tokens: torch.Tensor, assistant_mask: torch.Tensor, doc_ids: torch.Tensor):
    """(loss, number of target tokens) of packed rows: document-masked attention, per-document positions."""
    device = next(model.parameters()).device
    tokens, assistant_mask, doc_ids = tokens.to(device), assistant_mask.to(device), doc_ids.to(device)
    inputs, docs = tokens[:, :-1], doc_ids[:, :-1]
    logits = model(inputs, position_ids=document_positions(docs), mask=document_mask(docs))
    target_mask = sft_target_mask(assistant_mask, doc_ids)
    return sft_loss(logits, tokens, target_mask), int(target_mask.sum())


def unpacked_loss(model, batch: Batch):
    """(loss, number of target tokens) of right-padded single-example rows (causal attention is enough)."""
    batch = batch.to(next(model.parameters()).device)
    logits = model(batch.input_ids[:, :-1])
    return sft_loss(logits, batch.input_ids, batch.target_mask), int(batch.target_mask.sum())


def train_sft(cfg: SFTConfig, examples: list[dict], tokenizer=None, model=None, progress: bool = True) -> dict:
    """Fine-tune on chat examples; writes metrics.jsonl (loss, assistant tokens, tokens/s) and checkpoints.
    batch_size counts rows: packed rows of seq_len tokens, or single examples when cfg.pack is False."""
    torch.manual_seed(cfg.seed)
    model = model if model is not None else load_causal_lm(cfg.model, cfg.seed, cfg.device)
    encoded = [encode_sft_example(e, tokenizer) for e in examples]
    if cfg.pack:
        tokens, masks, docs = pack(encoded, cfg.seq_len, cfg.pad_id)
        num_rows = len(tokens)
    else:
        encoded = [(ids[:cfg.seq_len], mask[:cfg.seq_len]) for ids, mask in encoded if any(mask[1:cfg.seq_len])]
        num_rows = len(encoded)
    optimizer = adamw(model, cfg)
    total = cfg.total_steps(num_rows)

    def step_fn(step: int) -> dict:
        rows = example_indices(step, cfg.batch_size, num_rows, cfg.seed)
        with autocast(cfg):
            if cfg.pack:
                loss, n_targets = packed_loss(model, tokens[rows], masks[rows], docs[rows])
                n_tokens = len(rows) * cfg.seq_len
            else:
                batch = pad_batch([encoded[r][0] for r in rows], [encoded[r][1] for r in rows], cfg.pad_id)
                loss, n_targets = unpacked_loss(model, batch)
                n_tokens = int(batch.lengths.sum())
        loss.backward()
        return {"loss": loss.item(), "assistant_tokens": n_targets, "tokens": n_tokens}

    return run_stage_steps(cfg, model, optimizer, step_fn, total, "sft", progress=progress)
