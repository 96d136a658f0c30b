"""Model-based quality scoring: an LM rates a sample of documents, a small fast classifier scores every document.

1. Rate: an instruct model (a qwen25 / HF-format checkpoint directory) reads a sampled document and answers a
   score 0-5 on several dimensions (RATING_PROMPT). `FieldRater` reads ratings already stored in the documents'
   metadata instead (pre-rated data, or tests). The sample is chosen by a hash of the id, so it does not depend
   on the number of workers.
2. Train: `QualityClassifier`, logistic regression (numpy) on hashed word 1-2-gram features (log counts,
   L2-normalised, 2^18 buckets) fitted to the mean rating / 5 as a soft label; milliseconds per document, no GPU.
3. Filter: `QualityFilter` scores every document (metadata quality_score) and keeps it above a threshold.
Each part works alone: rate without training, or filter with a classifier trained elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from .. import generation
from ..model import load_model
from ..tokenizer import Tokenizer, encode_chat
from .mixture import hash01

DIMENSIONS = ("educational_value", "coherence", "writing_quality", "informativeness")
RATING_PROMPT = """Rate the document below on each dimension with an integer from 0 (worst) to 5 (best).
- educational_value: would it teach a student something useful?
- coherence: does it read as one connected, logical text?
- writing_quality: is it well written (grammar, clarity, no spam or boilerplate)?
- informativeness: does it carry facts, reasoning or working code rather than filler?
Answer with exactly one line per dimension, written `name: score`, and nothing else.

Document:
{text}"""
_WORDS = re.compile(r"\w+|[^\w\s]")


def parse_ratings(answer: str, dimensions: Sequence[str] = DIMENSIONS) -> dict[str, float] | None:
    """{dimension: score} from a model's answer, or None when a dimension is missing or out of 0-5."""
    out = {}
    for dim in dimensions:
        m = re.search(rf"{re.escape(dim)}\s*[:=]\s*(\d+(?:\.\d+)?)", answer, flags=re.IGNORECASE)
        if not m or not 0 <= float(m.group(1)) <= 5:
            return None
        out[dim] = float(m.group(1))
    return out


def rating_target(ratings: dict[str, float]) -> float:
    """The classifier's soft label: mean rating / 5, in [0, 1]."""
    return sum(ratings.values()) / (5.0 * len(ratings))


class LMRater:
    """Rates texts with an instruct model by RATING_PROMPT (greedy decoding); the model loads on first use."""

    def __init__(self, model: str | Path, tokenizer: str | Path | None = None, max_doc_chars: int = 3000,
                 max_new_tokens: int = 48, batch_size: int = 4, dimensions: Sequence[str] = DIMENSIONS):
        self.model_dir, self.tokenizer_dir = str(model), str(tokenizer or model)
        self.max_doc_chars, self.max_new_tokens, self.batch_size = max_doc_chars, max_new_tokens, batch_size
        self.dimensions = tuple(dimensions)
        self._model = self._tokenizer = None

    def prompt_ids(self, text: str) -> list[int]:
        """Chat-formatted prompt ids for one document (document text encoded as plain text, never as controls)."""
        messages = [{"role": "user", "content": RATING_PROMPT.format(text=text[:self.max_doc_chars])}]
        return encode_chat(self._tokenizer, messages, add_generation_prompt=True, sanitize=True).ids

    def __call__(self, texts: Sequence[str]) -> list[dict[str, float] | None]:
        if self._model is None:
            self._tokenizer = Tokenizer.from_dir(self.tokenizer_dir)
            self._model = load_model(self.model_dir)
        params = generation.SamplingParams(max_new_tokens=self.max_new_tokens,
                                eos_token_ids=[self._tokenizer.im_end_id, self._tokenizer.endoftext_id])
        out = []
        for i in range(0, len(texts), self.batch_size):
            prompts = [self.prompt_ids(t) for t in texts[i:i + self.batch_size]]
            for ids in generation.generate(self._model, prompts, params):
                out.append(parse_ratings(self._tokenizer.decode(ids, skip_special_tokens=True), self.dimensions))
        return out


class FieldRater:
    """Ratings read from document metadata: `field` holds a number 0-5 or a {dimension: score} dict."""

    def __init__(self, field: str = "rating"):
        self.field = field

    def rate_docs(self, docs: Sequence[Document]) -> list[dict[str, float] | None]:
        out = []
        for d in docs:
            value = d.metadata.get(self.field)
            out.append(None if value is None else dict(value) if isinstance(value, dict) else {"rating": float(value)})
        return out


def make_rater(spec: dict):
    """A rater from a config dict: {kind: lm, model: DIR, ...} or {kind: field, field: NAME}."""
    spec = dict(spec)
    kind = spec.pop("kind", "lm")
    if kind == "lm":
        return LMRater(**spec)
    if kind == "field":
        return FieldRater(**spec)
    raise ValueError(f"rater kind must be 'lm' or 'field', got {kind!r}")


class RatingSampler(PipelineStep):
    """Rates the documents with hash01(id) < sample_rate and writes them to `folder/{rank:05d}.jsonl`."""

    name = "quality rating"
    type = "⭐ - RATER"

    def __init__(self, folder: str | Path, rater: dict, sample_rate: float = 0.1, max_docs: int | None = None,
                 seed: int = 0, batch_size: int = 16):
        super().__init__()
        self.folder, self.rater_spec, self.sample_rate = str(folder), dict(rater), sample_rate
        self.max_docs, self.seed, self.batch_size = max_docs, seed, batch_size

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        rater = make_rater(self.rater_spec)
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        tmp = Path(self.folder) / f"{rank:05d}.jsonl.tmp"
        batch: list[Document] = []
        taken = 0
        with open(tmp, "w", encoding="utf-8") as f:
            def flush():
                rated = rater.rate_docs(batch) if isinstance(rater, FieldRater) else rater([d.text for d in batch])
                for d, r in zip(batch, rated):
                    self.stat_update("rated" if r else "unparsed")
                    if r:
                        f.write(json.dumps({"id": d.id, "text": d.text, "ratings": r}) + "\n")
                batch.clear()
            for doc in data:
                quota = self.max_docs is None or taken < self.max_docs
                if quota and hash01(doc.id, self.seed, "rate") < self.sample_rate:
                    batch.append(doc)
                    taken += 1
                    if len(batch) == self.batch_size:
                        flush()
                yield doc
            if batch:
                flush()
        os.replace(tmp, Path(self.folder) / f"{rank:05d}.jsonl")


def hashed_features(text: str, dim: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights of a text's hashed word unigrams and bigrams (log1p counts, L2-normalised)."""
    words = _WORDS.findall(text.lower())
    grams = Counter(words)
    grams.update(a + " " + b for a, b in zip(words, words[1:]))
    if not grams:
        return np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.float32)
    # crc32, not hash(): Python's string hash changes from process to process
    idx = np.array([zlib.crc32(g.encode("utf-8", "surrogatepass")) % dim for g in grams], dtype=np.int64)
    val = np.log1p(np.fromiter(grams.values(), dtype=np.float32, count=len(grams)))
    return idx, val / np.linalg.norm(val)


def bce_gradient(w: np.ndarray, b: float, feats: list[tuple[np.ndarray, np.ndarray]], y: np.ndarray,
                 l2: float = 0.0) -> tuple[np.ndarray, np.ndarray, float]:
    """Gradient of mean BCE(sigmoid(<w, x> + b), y) + l2/2 * |w_touched|^2 over a batch of sparse feature bags:
    (touched feature indices, their gradient, bias gradient)."""
    idx = np.concatenate([f[0] for f in feats])
    val = np.concatenate([f[1] for f in feats]).astype(np.float64)
    owner = np.repeat(np.arange(len(feats)), [len(f[0]) for f in feats])
    logits = np.bincount(owner, weights=w[idx] * val, minlength=len(feats)) + b
    err = (1.0 / (1.0 + np.exp(-logits)) - y) / len(feats)  # d(mean BCE)/d(logit)
    touched, inverse = np.unique(idx, return_inverse=True)
    grad = np.bincount(inverse, weights=err[owner] * val, minlength=len(touched)) + l2 * w[touched]
    return touched, grad, float(err.sum())


class QualityClassifier:
    """Logistic regression on hashed_features; score() gives a quality in (0, 1)."""

    def __init__(self, dim: int = 1 << 18):
        self.dim = dim
        self.weight = np.zeros(dim, dtype=np.float32)
        self.bias = 0.0

    def fit(self, texts: Sequence[str], targets: Sequence[float], epochs: int = 30, lr: float = 0.5,
            l2: float = 1e-6, batch_size: int = 32, seed: int = 0) -> QualityClassifier:
        """Fit to soft labels in [0, 1] by binary cross-entropy: mini-batch Adagrad with sparse updates (only the
        features a batch touches change, so a step costs its documents' features, not the 2^18 weights)."""
        if len(texts) != len(targets) or not texts:
            raise ValueError(f"fit needs as many targets as texts (and some), got {len(texts)} and {len(targets)}")
        feats = [hashed_features(t, self.dim) for t in texts]
        y = np.asarray(targets, dtype=np.float64)
        w, b = np.zeros(self.dim, dtype=np.float64), 0.0
        g2, b2 = np.full(self.dim, 1e-8), 1e-8
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            order = rng.permutation(len(feats))
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                touched, grad, gb = bce_gradient(w, b, [feats[i] for i in batch], y[batch], l2)
                g2[touched] += grad ** 2
                w[touched] -= lr * grad / np.sqrt(g2[touched])
                b2 += gb ** 2
                b -= lr * gb / np.sqrt(b2)
        self.weight, self.bias = w.astype(np.float32), float(b)
        return self

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Quality in (0, 1) for each text."""
        logits = []
        for t in texts:
            idx, val = hashed_features(t, self.dim)
            logits.append(float(self.weight[idx] @ val) + self.bias)
        return 1.0 / (1.0 + np.exp(-np.array(logits, dtype=np.float64)))

    def save(self, path: str | Path) -> Path:
        """Write the weights to an .npz file (atomically)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, weight=self.weight, bias=np.float64(self.bias), dim=np.int64(self.dim))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> QualityClassifier:
        """Read a classifier written by save()."""
        with np.load(path) as z:
            clf = cls(int(z["dim"]))
            clf.weight, clf.bias = z["weight"].astype(np.float32), float(z["bias"])
        return clf


def train_from_ratings(folder: str | Path, out: str | Path, **fit_kwargs) -> dict:
    """Train a QualityClassifier on every ratings file of `folder`, save it to `out`; returns fit statistics."""
    texts, targets = [], []
    for path in sorted(Path(folder).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            texts.append(record["text"])
            targets.append(rating_target(record["ratings"]))
    if len(texts) < 2:
        raise ValueError(f"{folder}: {len(texts)} rated documents; the classifier needs at least 2 "
                         "(raise sample_rate, or check that the rater's answers parse)")
    clf = QualityClassifier().fit(texts, targets, **fit_kwargs)
    clf.save(out)
    pred = clf.score(texts)
    return {"rated_docs": len(texts), "mean_target": float(np.mean(targets)),
            "train_mae": float(np.mean(np.abs(pred - np.array(targets))))}


class QualityFilter(BaseFilter):
    """Scores each document with a saved QualityClassifier (metadata quality_score); keeps score >= threshold."""

    name = "quality"

    def __init__(self, classifier: str | Path, threshold: float = 0.5, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.classifier_path, self.threshold = str(classifier), threshold
        self._clf = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._clf is None:
            self._clf = QualityClassifier.load(self.classifier_path)
        score = float(self._clf.score([doc.text])[0])
        doc.metadata["quality_score"] = score
        return True if score >= self.threshold else (False, "low_quality")
