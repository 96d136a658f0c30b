"""Domain classification: a topic (what a document is about) and a format (what it looks like).

The report down-samples over-represented web domains (e-commerce, social media, entertainment) and up-samples
high-value ones (technology, science, academia), with math and code as their own sources. Topics here come from
keyword lexicons (hits per 100 words, the best topic wins above a floor); formats from cheap surface statistics.
The `domain` a mixture weights is the format for code and math, otherwise the topic. A trained classifier can
replace the lexicons: `TopicClassifier` (softmax regression on the quality classifier's hashed n-gram features,
fitted to labelled examples) via `DomainTagger(classifier=FILE.npz)`, or any callable via `topic_fn=...`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from .quality import hashed_features

TOPIC_KEYWORDS: dict[str, tuple[str, ...]] = {
    "technology": ("software", "computer", "algorithm", "data", "network", "server", "program", "programming",
                   "api", "database", "cloud", "device", "internet", "code", "python", "linux", "hardware",
                   "processor", "memory", "digital", "app", "function", "module", "library", "compiler"),
    "science": ("experiment", "theory", "energy", "physics", "chemistry", "biology", "molecule", "cell", "species",
                "hypothesis", "evidence", "climate", "atom", "protein", "gene", "laboratory", "observation",
                "temperature", "particle", "evolution", "scientist", "scientific"),
    "academia": ("university", "research", "study", "journal", "paper", "thesis", "professor", "students",
                 "lecture", "analysis", "method", "results", "literature", "academic", "citation", "course",
                 "education", "theorem", "proof", "abstract"),
    "ecommerce": ("buy", "price", "shipping", "cart", "discount", "order", "sale", "deal", "product", "shop",
                  "store", "checkout", "free", "offer", "customer", "coupon", "delivery", "$"),
    "social_media": ("follow", "like", "share", "post", "comment", "lol", "retweet", "subscribe", "followers",
                     "trending", "hashtag", "dm", "omg", "friends", "viral"),
    "entertainment": ("movie", "film", "music", "song", "celebrity", "star", "show", "episode", "album", "actor",
                      "actress", "game", "concert", "tv", "series", "fans", "season", "trailer"),
}
GENERAL = "general"
_WORD = re.compile(r"[a-z]+|\$")
_CODE_LINE = re.compile(r"^\s*(def |class |import |from \S+ import|return\b|if .*:\s*$|for .*:\s*$|#include|"
                        r"[{}();]\s*$|\w+\s*=\s*[\w\[\('\"{])")
_MATH = re.compile(r"\$[^$]+\$|\\(frac|sum|int|sqrt|alpha|beta|theta|cdot|leq|geq)\b|[=<>]\s*-?\d|\d\s*[+\-*/^]\s*\d")


def classify_topic(text: str, min_hits_per_100: float = 1.0) -> str:
    """The topic whose keywords are most frequent (hits per 100 words), or 'general' below the floor."""
    words = _WORD.findall(text.lower())
    if not words:
        return GENERAL
    counts = dict.fromkeys(TOPIC_KEYWORDS, 0)
    lookup = {w: t for t, ws in TOPIC_KEYWORDS.items() for w in ws}
    for w in words:
        topic = lookup.get(w)
        if topic:
            counts[topic] += 1
    best = max(counts, key=lambda t: (counts[t], -list(TOPIC_KEYWORDS).index(t)))
    return best if 100.0 * counts[best] / len(words) >= min_hits_per_100 else GENERAL


def classify_format(text: str) -> str:
    """'code', 'math', 'list', 'dialogue' or 'prose' from line and symbol statistics."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "prose"
    n = len(lines)
    if sum(1 for ln in lines if _CODE_LINE.search(ln)) / n >= 0.3:
        return "code"
    if len(_MATH.findall(text)) / n >= 0.5:
        return "math"
    if sum(1 for ln in lines if re.match(r"^\s*([-*\u2022]|\d+[.)])\s", ln)) / n >= 0.5:
        return "list"
    if sum(1 for ln in lines if re.match(r"^\s*[A-Z][\w ]{0,20}:\s", ln)) / n >= 0.5:
        return "dialogue"
    return "prose"


def domain_of(topic: str, fmt: str) -> str:
    """The mixture domain: code and math are sources of their own, everything else goes by topic."""
    return fmt if fmt in ("code", "math") else topic


def softmax_gradient(w: np.ndarray, b: np.ndarray, feats: list[tuple[np.ndarray, np.ndarray]], y: np.ndarray,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradient of mean cross-entropy(softmax(x W + b), y) over sparse feature bags: (touched feature rows, their
    gradient rows, bias gradient). w: (dim, classes); y: class indices."""
    idx = np.concatenate([f[0] for f in feats])
    val = np.concatenate([f[1] for f in feats]).astype(np.float64)
    owner = np.repeat(np.arange(len(feats)), [len(f[0]) for f in feats])
    z = np.tile(b, (len(feats), 1))
    np.add.at(z, owner, w[idx] * val[:, None])
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(feats)), y] -= 1.0
    err = p / len(feats)
    touched, inverse = np.unique(idx, return_inverse=True)
    grad = np.zeros((len(touched), w.shape[1]))
    np.add.at(grad, inverse, err[owner] * val[:, None])
    return touched, grad, err.sum(axis=0)


class TopicClassifier:
    """Softmax regression on hashed_features: predicts a topic from labelled training examples."""

    def __init__(self, labels: Sequence[str], dim: int = 1 << 16):
        self.labels, self.dim = list(labels), dim
        self.weight = np.zeros((dim, len(self.labels)), dtype=np.float32)
        self.bias = np.zeros(len(self.labels))

    def fit(self, texts: Sequence[str], labels: Sequence[str], epochs: int = 20, lr: float = 0.5,
            batch_size: int = 32, seed: int = 0) -> TopicClassifier:
        """Mini-batch Adagrad with sparse row updates (only the features a batch touches change)."""
        unknown = sorted(set(labels) - set(self.labels))
        if unknown or len(texts) != len(labels) or not texts:
            raise ValueError(f"fit needs one known label per text: {len(texts)} texts, {len(labels)} labels, "
                             f"unknown labels {unknown} (known: {self.labels})")
        feats = [hashed_features(t, self.dim) for t in texts]
        y = np.array([self.labels.index(label) for label in labels])
        w, b = np.zeros(self.weight.shape), np.zeros(len(self.labels))
        g2, b2 = np.full(w.shape, 1e-8), np.full(b.shape, 1e-8)
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            order = rng.permutation(len(feats))
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                rows, grad, gb = softmax_gradient(w, b, [feats[i] for i in batch], y[batch])
                g2[rows] += grad ** 2
                w[rows] -= lr * grad / np.sqrt(g2[rows])
                b2 += gb ** 2
                b -= lr * gb / np.sqrt(b2)
        self.weight, self.bias = w.astype(np.float32), b
        return self

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most likely topic of each text."""
        out = []
        for t in texts:
            idx, val = hashed_features(t, self.dim)
            out.append(self.labels[int(np.argmax(val @ self.weight[idx] + self.bias))])
        return out

    def save(self, path: str | Path) -> Path:
        """Write weights and labels to an .npz file (atomically)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, weight=self.weight, bias=self.bias, labels=np.array(self.labels))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TopicClassifier:
        """Read a classifier written by save()."""
        with np.load(path) as z:
            clf = cls([str(x) for x in z["labels"]], int(z["weight"].shape[0]))
            clf.weight, clf.bias = z["weight"], z["bias"]
        return clf


class DomainTagger(PipelineStep):
    """Adds metadata topic, format and domain to every document (drops nothing). The topic comes from
    `topic_fn`, else a saved TopicClassifier (`classifier`), else the keyword lexicons."""

    name = "domains"
    type = "🏷 - TAGGER"

    def __init__(self, topic_fn: Callable[[str], str] | None = None, min_hits_per_100: float = 1.0,
                 classifier: str | Path | None = None):
        super().__init__()
        self.topic_fn, self.min_hits_per_100 = topic_fn, min_hits_per_100
        self.classifier = str(classifier) if classifier else None

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if self.topic_fn is None and self.classifier:
            clf = TopicClassifier.load(self.classifier)
            self.topic_fn = lambda text: clf.predict([text])[0]
        for doc in data:
            with self.track_time():
                topic = (self.topic_fn(doc.text) if self.topic_fn
                         else classify_topic(doc.text, self.min_hits_per_100))
                fmt = classify_format(doc.text)
                doc.metadata.update(topic=topic, format=fmt, domain=domain_of(topic, fmt))
            self.stat_update("total", f"domain_{doc.metadata['domain']}", f"format_{fmt}")
            yield doc
