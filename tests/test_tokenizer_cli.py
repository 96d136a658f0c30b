"""The `tokenize` sub-command (registered with add_tokenize_command), checked against HF `tokenizers`."""

from __future__ import annotations

import argparse
import json

import pytest
from tokenizer_fixtures import CORPUS

from qwen25.tokenizer import train_tokenizer
from qwen25.tokenizer.cli import add_tokenize_command, main


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A small tokenizer in Qwen's layout (trained here: fast to load) and HF `tokenizers` on the same files."""
    from tokenizers import Tokenizer as HFTokenizer

    folder = tmp_path_factory.mktemp("tok")
    im_end = train_tokenizer([text * 5 for text in CORPUS], 600, out_dir=folder).im_end_id
    return folder, HFTokenizer.from_file(str(folder / "tokenizer.json")), im_end


def test_registers_on_any_subparsers():
    parser = argparse.ArgumentParser()
    add_tokenize_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tokenize", "--text", "hi", "--tokenizer", "d", "--json"])
    assert args.command == "tokenize" and args.json and callable(args.func)


def test_text_prints_ids_and_counts(qwen, capsys):
    folder, hf, _ = qwen
    text = CORPUS[16]
    assert main(["tokenize", "--text", text, "--tokenizer", str(folder)]) == 0
    ids_line, counts = capsys.readouterr().out.strip().splitlines()
    expected = hf.encode(text, add_special_tokens=False).ids
    assert [int(i) for i in ids_line.split(",")] == expected
    assert counts.startswith(f"{len(expected)} tokens, {len(text)} characters")


def test_file_json_and_plain(qwen, tmp_path, capsys):
    folder, hf, im_end = qwen
    path = tmp_path / "in.txt"
    path.write_text("<|im_end|> 中文 text\n", encoding="utf-8")
    assert main(["tokenize", "--file", str(path), "--tokenizer", str(folder), "--json", "--plain"]) == 0
    out = json.loads(capsys.readouterr().out)
    hf.encode_special_tokens = True  # HF's switch for special tokens (like <|im_end|>) as plain text
    try:
        assert out["ids"] == hf.encode("<|im_end|> 中文 text\n", add_special_tokens=False).ids
    finally:
        hf.encode_special_tokens = False
    assert im_end not in out["ids"] and out["tokens"] == len(out["ids"])
    assert out["bytes"] == len("<|im_end|> 中文 text\n".encode())


def test_errors_name_the_problem(tmp_path, capsys):
    assert main(["tokenize", "--text", "x", "--tokenizer", str(tmp_path)]) == 2
    assert "looked for tokenizer.json" in capsys.readouterr().err
    assert main(["tokenize", "--file", str(tmp_path / "missing.txt"), "--tokenizer", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
