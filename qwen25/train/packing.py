"""Packed training sequences: several documents per row, attention kept inside each document.

A row of a packed batch is described by document ids (batch, seq): equal ids = same document. Attention
is causal and never crosses a document boundary, and RoPE positions restart at 0 for every document, so
a document's loss does not depend on what was packed beside it.
"""

from __future__ import annotations

import torch


def document_ids_from_eos(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Document ids for rows of concatenated documents, each ending with eos_id (the eos belongs to its document)."""
    ends = (tokens == eos_id).long()
    return torch.cumsum(ends, dim=-1) - ends


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of every token inside its document: (batch, seq) long, restarting at 0 on each new id."""
    b, t = doc_ids.shape
    index = torch.arange(t, device=doc_ids.device).expand(b, t)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index))
    return index - torch.cummax(first, dim=-1).values


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask (batch, 1, seq, seq): causal and within the same document."""
    t = doc_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]
