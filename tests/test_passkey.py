"""Passkey retrieval: prompt construction, scoring, the accuracy grid and heat map, the CLI, and (slow) a small
model trained at length L that keeps retrieving at 4L with Dual Chunk Attention and fails without it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import qwen25.generation
from qwen25.cli import main
from qwen25.evals.passkey import accuracy_grid, accuracy_table, evaluate_passkey, plot_heatmap
from qwen25.tasks.passkey import (
    FILLER, INSTRUCTION, KEY_LINE, QUESTION, WordTokenizer, passkey_answer, passkey_sample, passkey_samples,
)

ROOT = Path(__file__).resolve().parents[1]


class CharTokenizer:
    """One token per character (code point): the simplest object with encode/decode."""

    def encode(self, text: str) -> list[int]:
        return [ord(ch) for ch in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("tokenizer", [CharTokenizer(), WordTokenizer()], ids=["chars", "words"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_layout_length_and_depth(tokenizer, depth):
    length = 3000 if isinstance(tokenizer, CharTokenizer) else 600
    sample = passkey_sample(tokenizer, length, depth, 4242)
    text = tokenizer.decode(sample.ids)
    n = sample.fillers_before + sample.fillers_after
    # The longest prompt that fits: one more filler sentence would not.
    assert len(sample.ids) <= length < len(sample.ids) + len(tokenizer.encode(" " + FILLER))
    assert sample.fillers_before == round(depth * n) and n > 10
    key_line = KEY_LINE.format(key=4242)
    assert text.startswith(INSTRUCTION) and text.endswith(QUESTION) and text.count("4242") == 2
    head, tail = text.split(key_line)
    assert head.count(FILLER) == sample.fillers_before and tail.count(FILLER) == sample.fillers_after
    if depth == 0:
        assert head.strip() == INSTRUCTION
    if depth == 1:
        assert tail.strip() == QUESTION


def test_samples_cover_the_grid_with_seeded_keys():
    tok = WordTokenizer()
    samples = passkey_samples(tok, [200, 400], [0, 0.5, 1], trials=3, seed=7)
    assert [(s.length, s.depth) for s in samples] == [(n, d) for n in (200, 400) for d in (0, 0.5, 1) for _ in range(3)]
    assert all(1 <= s.passkey <= 50000 for s in samples)
    assert [s.passkey for s in samples] == [s.passkey for s in passkey_samples(tok, [200, 400], [0, 0.5, 1], 3, seed=7)]
    with pytest.raises(ValueError, match="too short"):
        passkey_sample(tok, 20, 0.5, 1)
    with pytest.raises(ValueError, match="depth"):
        passkey_sample(tok, 200, 1.5, 1)


def test_word_tokenizer_round_trip_and_answer_parsing():
    tok = WordTokenizer()
    text = passkey_sample(tok, 300, 0.5, 31337)
    assert tok.decode(text.ids).startswith(INSTRUCTION)
    assert tok.decode(tok.encode(" 31337. Remember it.")) == "31337. Remember it."
    assert passkey_answer(" 31337. Remember") == 31337
    assert passkey_answer("313370") == 313370 and passkey_answer(" the key") is None


def test_evaluation_scores_greedy_continuations(monkeypatch, tmp_path):
    """An oracle that reads the key off the prompt is always right, except where it is told to lie."""
    tok = CharTokenizer()

    def oracle(model, prompts, params, kv_int8=False):
        outs = []
        for ids in prompts:
            text = tok.decode(ids)
            key = int(re.search(r"The pass key is (\d+)\.", text).group(1))
            answer = key + 1 if text.index(KEY_LINE.format(key=key)) < 300 else key  # wrong when the key is early
            outs.append(tok.encode(f" {answer}. Remember")[:params.max_new_tokens])
        return outs

    monkeypatch.setattr(qwen25.generation, "generate", oracle)
    results = evaluate_passkey(None, tok, [1000, 2000], [0.0, 0.5, 1.0], trials=2, seed=3, batch_size=4)
    assert len(results) == 12
    lengths, depths, grid = accuracy_grid(results)
    assert lengths == [1000, 2000] and depths == [0.0, 0.5, 1.0]
    assert grid == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    table = accuracy_table(results)
    assert "| 0% | 0 | 0 |" in table and "| 100% | 100 | 100 |" in table and "66.7%" in table
    png = plot_heatmap(results, tmp_path / "heat.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_eval_passkey(tmp_path, capsys):
    from qwen25.tasks.passkey import passkey_text
    from qwen25.tokenizer import train_tokenizer

    model_dir = tmp_path / "tiny"
    assert main(["init", "--preset", "tiny", "--out", str(model_dir)]) == 0
    assert main(["eval", "passkey", "--model", str(model_dir), "--lengths", "100"]) != 0  # no tokenizer yet
    assert "cannot load a tokenizer" in capsys.readouterr().err
    train_tokenizer([passkey_text(123, 2, 3), "0123456789"] * 20, vocab_size=300, out_dir=model_dir)
    out = tmp_path / "eval"
    assert main(["eval", "passkey", "--model", str(model_dir), "--lengths", "300,600", "--depths", "0,1",
                 "--trials", "1", "--out", str(out), "--set",
                 'dual_chunk_attention_config={"chunk_size": 128, "local_size": 32}']) == 0
    printed = capsys.readouterr().out
    assert "| depth \\ length | 300 | 600 |" in printed
    rows = [json.loads(line) for line in (out / "passkey.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["length"] for r in rows} == {300, 600}
    assert (out / "passkey.png").stat().st_size > 0 and (out / "passkey.md").is_file()
