"""Domain classification: a topic (what a document is about) and a format (what it looks like).

The report down-samples over-represented web domains (e-commerce, social media, entertainment) and up-samples
high-value ones (technology, science, academia), with math and code as their own sources. Topics here come from
keyword lexicons (hits per 100 words, the best topic wins above a floor); formats from cheap surface statistics.
The `domain` a mixture weights is the format for code and math, otherwise the topic. A trained classifier can
replace the lexicons: any callable text -> topic fits `DomainTagger(topic_fn=...)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

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


class DomainTagger(PipelineStep):
    """Adds metadata topic, format and domain to every document (drops nothing)."""

    name = "domains"
    type = "🏷 - TAGGER"

    def __init__(self, topic_fn: Callable[[str], str] | None = None, min_hits_per_100: float = 1.0):
        super().__init__()
        self.topic_fn, self.min_hits_per_100 = topic_fn, min_hits_per_100

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            with self.track_time():
                topic = (self.topic_fn(doc.text) if self.topic_fn
                         else classify_topic(doc.text, self.min_hits_per_100))
                fmt = classify_format(doc.text)
                doc.metadata.update(topic=topic, format=fmt, domain=domain_of(topic, fmt))
            self.stat_update("total", f"domain_{doc.metadata['domain']}", f"format_{fmt}")
            yield doc
