"""The `qwen25` command line: init, info, generate, presets, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

from qwen25.cli import main
from qwen25.generation import SamplingParams, generate
from qwen25.model import load_model


def test_info_7b_preset(capsys):
    assert main(["info", "--preset", "7b"]) == 0
    out = capsys.readouterr().out
    assert "7,615,616,512 (7.62B)" in out
    assert "57,344 bytes/token" in out


def test_info_json_at_context(capsys):
    assert main(["info", "--preset", "0.5b-instruct", "--context", "4096", "--batch", "2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kv_bytes_per_token"] == 2 * 24 * 2 * 64 * 2
    assert info["kv_bytes_at_context"] == info["kv_bytes_per_token"] * 4096 * 2


def test_init_then_generate(tmp_path, capsys):
    out_dir = tmp_path / "tiny"
    assert main(["init", "--preset", "tiny", "--out", str(out_dir), "--seed", "3", "--set", "num_hidden_layers=3"]) == 0
    model = load_model(out_dir)
    assert model.config.num_hidden_layers == 3
    capsys.readouterr()
    assert main(["generate", "--model", str(out_dir), "--prompt-ids", "1,2,3", "--prompt-ids", "7",
                 "--max-new-tokens", "6", "--no-sample"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = generate(model, [[1, 2, 3], [7]], SamplingParams(max_new_tokens=6))
    assert [[int(t) for t in line.split(",")] for line in lines] == expected


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", "1"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["info", "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_help_explains_commands():
    out = subprocess.run([sys.executable, "-m", "qwen25.cli", "--help"], capture_output=True, text=True).stdout
    for command in ("init", "info", "generate", "presets"):
        assert command in out
    out = subprocess.run([sys.executable, "-m", "qwen25.cli", "info", "--help"], capture_output=True, text=True).stdout
    assert "KV-cache bytes per token" in out


def test_generate_text_with_the_checkpoint_tokenizer(tmp_path, capsys):
    from qwen25.tokenizer import train_tokenizer

    text = ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."] * 20
    tok = train_tokenizer(text, vocab_size=300)
    out_dir = tmp_path / "tiny-text"
    assert main(["init", "--preset", "tiny", "--out", str(out_dir), "--set", f"vocab_size={len(tok) + 10}"]) == 0
    tok.save(out_dir)
    capsys.readouterr()
    assert main(["generate", "--model", str(out_dir), "--prompt", "The sky is", "--max-new-tokens", "8",
                 "--no-sample"]) == 0
    printed = capsys.readouterr().out.strip()
    model = load_model(out_dir)
    ids = generate(model, [tok.encode("The sky is")], SamplingParams(max_new_tokens=8), vocab_limit=len(tok))[0]
    assert all(t < len(tok) for t in ids)  # the 10 padding rows are never produced
    assert printed == tok.decode(ids, skip_special_tokens=True).strip()
    assert main(["tokenize", "--tokenizer", str(out_dir), "--text", "The sky is blue", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == tok.encode("The sky is blue")
