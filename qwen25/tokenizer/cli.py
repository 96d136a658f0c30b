"""The `qwen25 tokenize` sub-command: token ids and counts of a text or a file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .files import TokenizerError


def add_tokenize_command(subparsers) -> argparse.ArgumentParser:
    """Register `tokenize` on an argparse subparsers object; the command runs via args.func(args) -> exit code."""
    p = subparsers.add_parser("tokenize", help="token ids and counts of a text with a Qwen tokenizer",
                              description="Encode a text (or a file) and print its ids, comma-separated (the form "
                                          "`qwen25 generate --prompt-ids` takes), then the counts.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to encode")
    source.add_argument("--file", help="a UTF-8 text file to encode ('-' reads stdin)")
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="a directory with tokenizer.json, or vocab.json + merges.txt (e.g. a checkpoint)")
    p.add_argument("--plain", action="store_true",
                   help="encode control-token strings such as <|im_end|> as plain text (for untrusted text)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=cmd_tokenize)
    return p


def _read_input(args) -> str:
    if args.text is not None:
        return args.text
    if args.file == "-":
        return sys.stdin.read()
    path = Path(args.file)
    if not path.is_file():
        raise TokenizerError(f"--file {path}: no such file")
    return path.read_text(encoding="utf-8")


def cmd_tokenize(args) -> int:
    from .bbpe import Tokenizer

    text = _read_input(args)
    tokenizer = Tokenizer.from_dir(args.tokenizer)
    ids = tokenizer.encode(text, allowed_special="none" if args.plain else "all")
    counts = {"tokens": len(ids), "characters": len(text), "bytes": len(text.encode("utf-8"))}
    if args.json:
        print(json.dumps({"ids": ids, **counts}))
    else:
        print(",".join(map(str, ids)))
        ratio = f", {counts['bytes'] / len(ids):.2f} bytes/token" if ids else ""
        print(f"{counts['tokens']} tokens, {counts['characters']} characters, {counts['bytes']} bytes{ratio}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command on its own: python -m qwen25.tokenizer.cli tokenize ..."""
    parser = argparse.ArgumentParser(prog="qwen25")
    add_tokenize_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TokenizerError as e:
        print(f"qwen25 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
