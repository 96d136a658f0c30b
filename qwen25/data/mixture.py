"""Deterministic domain mixture: resample documents so each domain gets its target share of the output.

Two passes. `DomainHistogram` counts, per domain, the size of the documents (tokens, characters or documents)
in 65,536 bins of a hash u(id) in [0, 1); the per-task files add up to the same histogram for any number of
tasks. `plan_mixture` turns the merged histogram into a rate per domain (target weight * output size / domain
size): `floor(rate)` copies of every document, plus one more for documents with u below a cutoff chosen on
the histogram so the extra copies add up to the fractional part. `MixtureSampler` applies the plan; a document's
fate depends only on its id, domain and the plan, so reruns and any worker count give the same documents.
Accuracy: each domain's output size is off by at most half the size of the documents in one hash bin (in
practice one document), so realised weights are within max_doc_size / total_size of the targets.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from copy import deepcopy
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

BINS = 1 << 16


def hash01(key: str, seed: int = 0, purpose: str = "mixture") -> float:
    """A uniform number in [0, 1) from a string, the same on every machine and process (unlike hash()).
    Each use has its own `purpose` so the draws are independent: were the mixture's keep decision and the
    packing order the same hash, the documents a down-sampled domain keeps would all be packed first."""
    digest = hashlib.blake2b(f"{purpose}:{seed}:{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def doc_size(doc, unit: str) -> int:
    """Size of a document in the mixture's unit: 'tokens' (metadata token_count), 'chars' or 'docs'."""
    if unit == "tokens":
        if "token_count" not in doc.metadata:
            raise KeyError(f"document {doc.id}: no metadata token_count for a mixture in tokens (count tokens first "
                           "with the tokenize/decontaminate step, or use unit: chars)")
        return int(doc.metadata["token_count"])
    if unit == "chars":
        return len(doc.text)
    if unit == "docs":
        return 1
    raise ValueError(f"mixture unit must be tokens, chars or docs, got {unit!r}")


class DomainHistogram(PipelineStep):
    """Pass 1: writes {domain: {bin: size}} for this task's documents to `folder/{rank:05d}.json`."""

    name = "mixture counts"
    type = "📊 - STATS"

    def __init__(self, folder: str | Path, unit: str = "tokens", seed: int = 0, key: str = "domain"):
        super().__init__()
        self.folder, self.unit, self.seed, self.key = str(folder), unit, seed, key

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        hist: dict[str, dict[int, int]] = {}
        for doc in data:
            domain = str(doc.metadata.get(self.key, "general"))
            b = int(hash01(doc.id, self.seed) * BINS)
            bins = hist.setdefault(domain, {})
            bins[b] = bins.get(b, 0) + doc_size(doc, self.unit)
            self.stat_update("total", f"domain_{domain}")
            yield doc
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        tmp = Path(self.folder) / f"{rank:05d}.json.tmp"
        tmp.write_text(json.dumps(hist))
        os.replace(tmp, Path(self.folder) / f"{rank:05d}.json")


def merge_histograms(folder: str | Path) -> dict[str, np.ndarray]:
    """Sum the per-task histograms of a folder: {domain: int64 array of BINS sizes}."""
    merged: dict[str, np.ndarray] = {}
    files = sorted(Path(folder).glob("*.json"))
    if not files:
        raise FileNotFoundError(f"{folder}: no mixture histograms (*.json) to merge")
    for path in files:
        for domain, bins in json.loads(path.read_text()).items():
            arr = merged.setdefault(domain, np.zeros(BINS, dtype=np.int64))
            for b, size in bins.items():
                arr[int(b)] += size
    return dict(sorted(merged.items()))


def _cutoff(hist: np.ndarray, target: float) -> float:
    """The u cutoff whose documents (u < cutoff) add up closest to `target`, at a bin boundary."""
    cum = np.concatenate([[0], np.cumsum(hist)])
    b = int(np.argmin(np.abs(cum - target)))
    return b / BINS


def plan_mixture(hists: dict[str, np.ndarray], weights: dict[str, float], total: float | None = None,
                 max_repeat: float | None = None, unlisted_rate: float = 0.0,
                 factors: dict[str, float] | None = None) -> dict:
    """Per-domain rate, whole copies and cutoff that give each listed domain `weight` of `total` (default: the
    input size of the listed domains). Domains without a weight are resampled by their `factors` entry (the
    report's "down-sample e-commerce, up-sample science" as rates; a factor for an absent domain is ignored),
    else kept at `unlisted_rate`."""
    factors = dict(factors or {})
    unknown = sorted(set(weights) - set(hists))
    if unknown:
        raise ValueError(f"mixture weights name domains with no documents: {unknown} (present: {sorted(hists)})")
    if weights and (any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0):
        raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {weights}")
    if not weights and not factors:
        raise ValueError("a mixture needs weights and/or factors")
    if any(f < 0 for f in factors.values()):
        raise ValueError(f"mixture factors must be >= 0, got {factors}")
    norm = sum(weights.values()) or 1.0
    sizes = {d: int(h.sum()) for d, h in hists.items()}
    total = float(total) if total is not None else float(sum(sizes[d] for d in weights))
    plan = {}
    for domain, hist in hists.items():
        if domain in weights:
            rate = weights[domain] / norm * total / sizes[domain] if sizes[domain] else 0.0
        else:
            rate = factors.get(domain, unlisted_rate)
        capped = max_repeat is not None and rate > max_repeat
        rate = min(rate, max_repeat) if capped else rate
        copies = math.floor(rate)
        plan[domain] = {"rate": rate, "copies": copies, "cutoff": _cutoff(hist, (rate - copies) * sizes[domain]),
                        "size_in": sizes[domain], "target_weight": weights.get(domain, 0.0) / norm,
                        "capped": capped}
    for p in plan.values():
        p["expected_out"] = p["copies"] * p["size_in"] + (p["rate"] - p["copies"]) * p["size_in"]
    return plan


def mixture_copies(doc_id: str, domain: str, plan: dict, seed: int = 0) -> int:
    """How many times a document appears in the output under `plan` (0 = dropped)."""
    p = plan.get(domain)
    if p is None:
        return 0
    return p["copies"] + int(hash01(doc_id, seed) < p["cutoff"])


class MixtureSampler(PipelineStep):
    """Pass 2: yields each document mixture_copies() times (copy j > 0 gets id 'ID#rj'); reads the plan file."""

    name = "mixture"
    type = "🎲 - SAMPLER"

    def __init__(self, plan_file: str | Path, seed: int = 0, key: str = "domain", exclusion_writer=None):
        super().__init__()
        self.plan_file, self.seed, self.key = str(plan_file), seed, key
        self.exclusion_writer = exclusion_writer

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        plan = json.loads(Path(self.plan_file).read_text())["domains"]
        writer = self.exclusion_writer
        if writer:
            writer.__enter__()
        try:
            for doc in data:
                domain = str(doc.metadata.get(self.key, "general"))
                n = mixture_copies(doc.id, domain, plan, self.seed)
                self.stat_update("total")
                if n == 0:
                    self.stat_update("dropped", "dropped_downsampled")
                    if writer:
                        doc.metadata["filter_reason"] = "downsampled"
                        writer.write(doc, rank)
                    continue
                self.stat_update("forwarded", value=n)
                # copies are made before anything downstream can change the original
                outs = [doc] + [deepcopy(doc) for _ in range(n - 1)]
                for j, out in enumerate(outs):
                    if j:
                        out.id = f"{doc.id}#r{j}"
                    out.metadata["mixture_copy"] = j
                    yield out
        finally:
            if writer:
                writer.__exit__(None, None, None)
