"""Pipeline steps on datatrove: readers, the heuristic filters by name, token counting, decontamination."""

from __future__ import annotations

import zlib
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.utils.logging import logger

from ..tokenizer import Tokenizer
from .decontam import TestSetIndex, build_index


class TextFolderReader(BaseDiskReader):
    """One document per text file (e.g. `*.py` or `*.md` under a folder); id = path relative to the folder.

    A file that is not valid UTF-8 is reported (stat `corrupt_files`, a warning) and skipped, not fatal."""

    name = "📄 Text files"

    def __init__(self, data_folder, glob_pattern: str | None = None, **kwargs):
        super().__init__(data_folder, glob_pattern=glob_pattern, **kwargs)

    def read_file(self, filepath: str) -> DocumentsPipeline:
        try:
            with self.data_folder.open(filepath, "rb") as f:
                text = f.read().decode("utf-8")
        except (UnicodeDecodeError, OSError) as e:
            logger.warning(f"skipping unreadable input file {filepath}: {e}")
            self.stat_update("corrupt_files")
            return
        doc = self.get_document_from_dict({"text": text, "id": filepath}, filepath, 0)
        if doc:
            yield doc


class SafeJsonlReader(JsonlReader):
    """Datatrove's JsonlReader, made to survive any input: a line that is not JSON, not an object, or whose text
    is missing, empty or not a string is skipped and counted (stats `skipped_<reason>`, which stats.json reports
    per step), never fatal; a damaged file (truncated gzip, I/O error, bad UTF-8) keeps the documents read so far
    and reports the rest (stat `corrupt_files`)."""

    def read_file(self, filepath: str) -> DocumentsPipeline:
        try:
            with self.data_folder.open(filepath, "r", compression=self.compression) as f:
                for li, line in enumerate(f):
                    with self.track_time():
                        doc = self._document(line, filepath, li)
                    if doc is not None:
                        yield doc
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
            logger.warning(f"skipping the rest of damaged input file {filepath}: {e}")
            self.stat_update("corrupt_files")

    def _document(self, line: str, filepath: str, li: int) -> Document | None:
        import orjson

        if not line.strip():
            return None
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            return self._skip("invalid_json", filepath, li)
        if not isinstance(record, dict):
            return self._skip("not_an_object", filepath, li)
        text = record.get(self.text_key)
        if not isinstance(text, str):
            return self._skip("no_text" if text is None else "text_not_a_string", filepath, li)
        if not text:
            return self._skip("empty_text", filepath, li)
        try:
            return self.get_document_from_dict(record, filepath, li) or self._skip("empty_text", filepath, li)
        except (TypeError, ValueError, KeyError, AttributeError) as e:  # an id or metadata Document refuses
            return self._skip("invalid_record", filepath, li, e)

    def _skip(self, reason: str, filepath: str, li: int, error: Exception | None = None) -> None:
        self.stat_update(f"skipped_{reason}")
        detail = f": {error}" if error else ""
        logger.warning(f"{filepath}:{li + 1}: record skipped ({reason.replace('_', ' ')}{detail})")
        return None


def make_reader(spec: dict) -> BaseDiskReader:
    """The input reader from a config dict: {kind: jsonl|text, path: DIR, glob: PATTERN, text_key, id_key}."""
    spec = dict(spec)
    kind, path, glob = spec.pop("kind", "jsonl"), spec.pop("path"), spec.pop("glob", None)
    if kind == "jsonl":
        return SafeJsonlReader(str(path), glob_pattern=glob, **spec)
    if kind == "text":
        return TextFolderReader(str(path), glob_pattern=glob, **spec)
    raise ValueError(f"input kind must be 'jsonl' or 'text', got {kind!r}")


def make_filters(spec: dict, exclusion_writer_for) -> list[BaseFilter]:
    """Datatrove's heuristic filters by name, each with its own side output of dropped documents.

    spec maps gopher_quality | gopher_repetition | c4 | fineweb to keyword arguments (or {} for the defaults).
    The Gopher and C4 filters use spaCy's blank English tokenizer (no model download)."""
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    known = {"gopher_quality": GopherQualityFilter, "gopher_repetition": GopherRepetitionFilter,
             "c4": C4QualityFilter, "fineweb": FineWebQualityFilter}
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise ValueError(f"unknown filters {unknown}; known: {sorted(known)}")
    return [known[name](exclusion_writer=exclusion_writer_for(name), **(kwargs or {}))
            for name, kwargs in spec.items()]


class TokenCounter(PipelineStep):
    """Sets metadata token_count with our tokenizer (text encoded as plain text) where it is not set yet."""

    name = "token count"
    type = "🔢 - TOKENIZER"

    def __init__(self, tokenizer_dir: str | Path, batch_size: int = 256):
        super().__init__()
        self.tokenizer_dir, self.batch_size = str(tokenizer_dir), batch_size

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        tok = None  # loaded on first need: documents that went through decontamination are counted already
        batch: list[Document] = []

        def flush():
            nonlocal tok
            if not batch:
                return
            if tok is None:
                tok = Tokenizer.from_dir(self.tokenizer_dir)
            for doc, ids in zip(batch, tok.encode_batch([d.text for d in batch], allowed_special="none")):
                doc.metadata["token_count"] = len(ids)
                self.stat_update("tokens", value=len(ids))
            yield from batch
            batch.clear()
        for doc in data:
            if "token_count" in doc.metadata:
                self.stat_update("tokens", value=int(doc.metadata["token_count"]))
                yield doc
                continue
            batch.append(doc)
            if len(batch) == self.batch_size:
                yield from flush()
        yield from flush()


class EffectiveTokens(PipelineStep):
    """Counts tokens and quality-weighted tokens per domain, passing every document on unchanged.

    The report's "not every token counts equally": a document of n tokens with quality score q in (0, 1] (the
    quality step's metadata quality_score) contributes q * n effective tokens, so D_eff = sum(q * n) beside
    |D| = sum(n). Stats: tokens/DOMAIN, effective_tokens/DOMAIN (documents with no domain count as "all"), and
    unscored_tokens for documents the quality step never saw (they have no q and add nothing to D_eff)."""

    name = "effective tokens"
    type = "📊 - STATS"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            n = doc.metadata.get("token_count")
            if n is not None:
                domain = doc.metadata.get("domain", "all")
                self.stat_update(f"tokens/{domain}", value=int(n))
                q = doc.metadata.get("quality_score")
                if q is None:
                    self.stat_update("unscored_tokens", value=int(n))
                else:
                    self.stat_update(f"effective_tokens/{domain}", value=float(q) * int(n))
            yield doc


class DecontaminationFilter(BaseFilter):
    """Drops documents that meet the LCS rule against any test item (decontam.py); sets metadata token_count.

    test_sets: [{path: FILE.jsonl[.gz], fields: [...], name_field: ...}]; the dropped documents carry the test
    item, window and LCS in metadata `contamination`."""

    name = "decontamination"

    def __init__(self, tokenizer_dir: str | Path, test_sets: list[dict], window: int = 512, stride: int = 128,
                 exclusion_writer=None, batch_size: int = 64):
        super().__init__(exclusion_writer, batch_size=batch_size)
        self.tokenizer_dir, self.test_sets = str(tokenizer_dir), [dict(t) for t in test_sets]
        self.window, self.stride = window, stride
        self._tok = self._index = None

    def _load(self) -> None:
        self._tok = Tokenizer.from_dir(self.tokenizer_dir)
        self._index: TestSetIndex = build_index(
            self.test_sets, lambda texts: self._tok.encode_batch(texts, allowed_special="none"),
            self.window, self.stride)

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        if self._index is None:
            self._load()
        out = []
        for doc, ids in zip(batch, self._tok.encode_batch([d.text for d in batch], allowed_special="none")):
            doc.metadata["token_count"] = len(ids)
            hit = self._index.find(ids)
            if hit is None:
                out.append(True)
            else:
                doc.metadata["contamination"] = {"test": hit.test_name, "lcs": hit.lcs, "test_len": hit.test_len,
                                                 "window_start": hit.window_start, "window_len": hit.window_len}
                out.append((False, "contaminated"))
        return out

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]
