"""Reading and writing HF tokenizer files (tokenizer.json, vocab.json + merges.txt, tokenizer_config.json) for
byte-level BPE vocabularies laid out like Qwen2.5's, into and from one plain `Vocabulary` object (chat template
included)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from .bpe import bytes_to_tokens, token_to_bytes, tokens_to_bytes

# Qwen's pre-tokenizer: contractions, letter runs with one optional leading non-letter, single digits,
# punctuation runs (with a leading space and trailing newlines), newline runs, and other whitespace.
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# The 22 control tokens of Qwen2.5, in id order (151643.. for the released vocabulary; right after the regular
# tokens for trained ones). The first 14 are "special" (skipped by decode(skip_special_tokens=True));
# the tool-call and fill-in-the-middle tokens are not.
QWEN_CONTROL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
QWEN_SPECIAL_COUNT = 14  # QWEN_CONTROL_TOKENS[:14] are special

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}

# transformers (>= 4.43) may keep the template in a file of its own instead of tokenizer_config.json.
CHAT_TEMPLATE_FILE = "chat_template.jinja"


@cache
def official_chat_template() -> str:
    """Qwen2.5-Instruct's official chat template (Apache-2.0), byte for byte as Qwen ships it; package data."""
    return resources.files(__package__).joinpath("qwen2_5.jinja").read_bytes().decode("utf-8")


class TokenizerError(ValueError):
    """A tokenizer directory or file that cannot be used, or a bad argument; the message says which."""


@dataclass(frozen=True)
class AddedToken:
    """A control token matched in text before BPE. `special` tokens are dropped by skip_special_tokens."""
    content: str
    id: int
    special: bool


@dataclass
class Vocabulary:
    """Everything a byte-level BPE tokenizer consists of, independent of the file format."""
    ranks: dict[bytes, int]                 # regular tokens: bytes -> id
    merges: list[tuple[bytes, bytes]]       # in priority order
    added: list[AddedToken] = field(default_factory=list)
    pattern: str = QWEN_PATTERN
    nfc: bool = True
    eos_token: str | None = None
    pad_token: str | None = None
    ignore_merges: bool = False
    fingerprint: str = ""                   # sha256 of the files ranks and merges came from ("" if built in memory)
    source: str = "<memory>"
    # tokenizer_config.json's chat_template: a Jinja string, or named templates [{"name": ..., "template": ...}]
    chat_template: str | list[dict] | None = None

    def is_chatml(self) -> bool:
        """Whether the vocabulary has Qwen's ChatML turn tokens <|im_start|> and <|im_end|>."""
        return {"<|im_start|>", "<|im_end|>"} <= {t.content for t in self.added}


def read_vocabulary(path: str | Path) -> Vocabulary:
    """Read a tokenizer directory: tokenizer.json (preferred), else vocab.json + merges.txt with the added
    tokens from tokenizer_config.json. eos/pad token names come from tokenizer_config.json when present."""
    path = Path(path)
    if path.is_file() and path.name == "tokenizer.json":
        path = path.parent
    if not path.is_dir():
        raise TokenizerError(f"tokenizer directory {path} does not exist")
    config_path = path / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    if (path / "tokenizer.json").is_file():
        vocab = _from_tokenizer_json(path / "tokenizer.json")
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        vocab = _from_vocab_and_merges(path, config)
    else:
        raise TokenizerError(f"no tokenizer files in {path}: looked for tokenizer.json, or vocab.json + merges.txt "
                             f"(+ tokenizer_config.json for the added tokens); found "
                             f"{sorted(p.name for p in path.iterdir()) or 'nothing'}")
    vocab.eos_token = _token_name(config.get("eos_token")) or _default_token(vocab)
    vocab.pad_token = _token_name(config.get("pad_token")) or _default_token(vocab)
    vocab.chat_template = _read_chat_template(path, config)
    return vocab


def _read_chat_template(path: Path, config: dict) -> str | list[dict] | None:
    """The chat template of a tokenizer directory: chat_template.jinja if present (transformers reads it first),
    else tokenizer_config.json's chat_template (a string, or a list of {"name", "template"})."""
    if (path / CHAT_TEMPLATE_FILE).is_file():
        return (path / CHAT_TEMPLATE_FILE).read_bytes().decode("utf-8")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    named = isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
        for t in template)
    if not named:
        raise TokenizerError(f"{path / 'tokenizer_config.json'}: chat_template must be a string or a list of "
                             f"{{\"name\": ..., \"template\": ...}} objects, got {json.dumps(template)[:200]}")
    return [{"name": t["name"], "template": t["template"]} for t in template]


def tokenizer_json(vocab: Vocabulary, added: bool = True) -> dict:
    """The tokenizer.json content of a vocabulary, in the layout of Qwen2.5's (without added tokens if asked)."""
    ordered = sorted(vocab.ranks.items(), key=lambda item: item[1])
    token_vocab = dict(zip(bytes_to_tokens([b for b, _ in ordered]), (i for _, i in ordered)))
    merges = [list(pair) for pair in zip(bytes_to_tokens([a for a, _ in vocab.merges]),
                                         bytes_to_tokens([b for _, b in vocab.merges]))]
    added_tokens = [_added_entry(t) | {"id": t.id} for t in vocab.added] if added else []
    split = {"type": "Split", "pattern": {"Regex": vocab.pattern}, "behavior": "Isolated", "invert": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
        "normalizer": {"type": "NFC"} if vocab.nfc else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, _BYTE_LEVEL]},
        "post_processor": _BYTE_LEVEL, "decoder": _BYTE_LEVEL,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": vocab.ignore_merges, "vocab": token_vocab,
                  "merges": merges},
    }


def _added_entry(token: AddedToken) -> dict:
    return {"content": token.content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
            "special": token.special}


def write_vocabulary(vocab: Vocabulary, path: str | Path, model_max_length: int = 32768) -> list[Path]:
    """Write tokenizer.json, vocab.json, merges.txt and tokenizer_config.json in the layout of Qwen2.5's files
    (loadable by `tokenizers.Tokenizer.from_file` and transformers' AutoTokenizer). Returns the paths.

    tokenizer_config.json gets the vocabulary's chat template; a ChatML vocabulary without one gets Qwen2.5's
    official template, so every directory written here can render chats. A chat_template.jinja already in the
    directory is removed: it would take precedence in transformers over the template written here."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    data = tokenizer_json(vocab)
    config = {
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(t.id): _added_entry(t) for t in vocab.added},
        "additional_special_tokens": [t.content for t in vocab.added if t.special and t.content != vocab.eos_token
                                      and t.content != vocab.pad_token],
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": vocab.eos_token,
        "errors": "replace", "model_max_length": model_max_length, "pad_token": vocab.pad_token,
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    template = vocab.chat_template
    if template is None and vocab.is_chatml():
        template = official_chat_template()
    if template is not None:
        config["chat_template"] = template
    files = {
        "tokenizer.json": json.dumps(data, ensure_ascii=False, indent=2),
        "vocab.json": json.dumps(data["model"]["vocab"], ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in data["model"]["merges"]),
        "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2),
    }
    written = []
    for name, text in files.items():
        (path / name).write_text(text, encoding="utf-8")
        written.append(path / name)
    (path / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
    return written


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None


def _token_name(value) -> str | None:
    """tokenizer_config.json writes a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _default_token(vocab: Vocabulary) -> str | None:
    return "<|endoftext|>" if any(t.content == "<|endoftext|>" for t in vocab.added) else None


def _to_bytes(tokens: list[str], source: str, what: str) -> list[bytes]:
    converted = tokens_to_bytes(tokens)
    if converted is None:
        bad = next(t for t in tokens if token_to_bytes(t) is None)
        raise TokenizerError(f"{source}: {what} {bad!r} has a character outside the byte-level alphabet")
    return converted


def _ranks_from_strings(token_ids: dict[str, int], source: str) -> dict[bytes, int]:
    ranks = dict(zip(_to_bytes(list(token_ids), source, "vocabulary entry"), token_ids.values()))
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{source}: the vocabulary lacks {len(missing)} of the 256 single bytes "
                             f"(first: {missing[0]:#04x}); byte-level BPE needs all of them")
    return ranks


def _merge_pairs(raw: list, source: str) -> list[tuple[bytes, bytes]]:
    pairs = [entry.split(" ") if isinstance(entry, str) else entry for entry in raw]
    for entry, pair in zip(raw, pairs):
        if len(pair) != 2:
            raise TokenizerError(f"{source}: merge entry {entry!r} is not a pair of tokens")
    left = _to_bytes([p[0] for p in pairs], source, "merge token")
    right = _to_bytes([p[1] for p in pairs], source, "merge token")
    return list(zip(left, right))


def _added_tokens(entries: list[dict], source: str) -> list[AddedToken]:
    tokens = []
    for entry in entries:
        for option in ("lstrip", "rstrip", "single_word", "normalized"):
            if entry.get(option):
                raise TokenizerError(f"{source}: added token {entry.get('content')!r} sets {option}=true, "
                                     "which this tokenizer does not implement (Qwen's tokens set it false)")
        tokens.append(AddedToken(entry["content"], int(entry["id"]), bool(entry.get("special", False))))
    return sorted(tokens, key=lambda t: t.id)


def _expect(condition: bool, source: str, what: str, found) -> None:
    if not condition:
        raise TokenizerError(f"{source}: unsupported {what}: {json.dumps(found)[:300]} "
                             "(expected the layout of Qwen2.5's tokenizer.json)")


def _from_tokenizer_json(file: Path) -> Vocabulary:
    raw = file.read_bytes()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{file} is not valid JSON: {e}") from None
    source = str(file)
    model = data.get("model") or {}
    _expect(model.get("type") == "BPE" and not model.get("dropout") and not model.get("continuing_subword_prefix")
            and not model.get("end_of_word_suffix"), source, "model", {k: v for k, v in model.items()
                                                                        if k not in ("vocab", "merges")})
    normalizer = data.get("normalizer")
    _expect(normalizer is None or normalizer.get("type") == "NFC", source, "normalizer", normalizer)
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    ok = (len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in steps[0].get("pattern", {})
          and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
          and steps[1].get("type") == "ByteLevel" and not steps[1].get("add_prefix_space")
          and not steps[1].get("use_regex", True))
    _expect(ok, source, "pre_tokenizer (want Split(Regex, Isolated) then ByteLevel without regex)", pre)
    decoder = data.get("decoder") or {}
    _expect(decoder.get("type") == "ByteLevel", source, "decoder", decoder)
    post = data.get("post_processor")
    _expect(post is None or post.get("type") == "ByteLevel", source, "post_processor (it would add tokens)", post)
    return Vocabulary(ranks=_ranks_from_strings(model["vocab"], source), merges=_merge_pairs(model["merges"], source),
                      added=_added_tokens(data.get("added_tokens", []), source),
                      pattern=steps[0]["pattern"]["Regex"], nfc=normalizer is not None,
                      ignore_merges=bool(model.get("ignore_merges")), fingerprint=hashlib.sha256(raw).hexdigest(),
                      source=source)


def _from_vocab_and_merges(path: Path, config: dict) -> Vocabulary:
    """The slow-tokenizer layout: Qwen's regex and NFC are implied; added tokens come from tokenizer_config.json."""
    vocab_raw = (path / "vocab.json").read_bytes()
    merges_raw = (path / "merges.txt").read_bytes()
    lines = [line for line in merges_raw.decode("utf-8").splitlines() if line and not line.startswith("#version")]
    decoder = config.get("added_tokens_decoder")
    if not decoder:
        raise TokenizerError(f"{path}: without tokenizer.json the added tokens are read from "
                             "tokenizer_config.json's added_tokens_decoder, which is missing")
    entries = [{**entry, "id": int(i)} for i, entry in decoder.items()]
    added = _added_tokens(entries, str(path / "tokenizer_config.json"))
    return Vocabulary(ranks=_ranks_from_strings(json.loads(vocab_raw), str(path / "vocab.json")),
                      merges=_merge_pairs(lines, str(path / "merges.txt")), added=added,
                      fingerprint=hashlib.sha256(vocab_raw + b"\0" + merges_raw).hexdigest(), source=str(path))
