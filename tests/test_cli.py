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


def _subcommands(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_shared_flags_are_spelt_and_explained_one_way():
    """--set, --quiet, --threads, --dtype mean the same on every command that has them (utils.add_common_flags)."""
    from qwen25.cli import build_parser
    from qwen25.evals.cli import _passkey_parser, _task_parser
    from qwen25.utils import SET_SYNTAX

    parsers = list(_subcommands(build_parser())) + [("eval TASK", _task_parser()), ("eval passkey", _passkey_parser())]
    seen = {"--set": 0, "--quiet": 0}
    for name, sub in parsers:
        for action in sub._actions:
            flags = set(action.option_strings)
            if "--set" in flags:
                seen["--set"] += 1
                assert action.help.endswith(SET_SYNTAX), name
            if "--quiet" in flags:
                seen["--quiet"] += 1
                assert flags == {"--quiet", "--no-progress"} and action.dest == "quiet", name
            if "--threads" in flags:
                assert action.type is int and action.help == "torch CPU threads (default: torch's)", name
    assert seen["--set"] >= 7 and seen["--quiet"] >= 8  # init, eval passkey, train, sweep, recipe, 5 post stages
    recipe = dict(_subcommands(build_parser()))["recipe"]
    assert any("--set" in a.option_strings for a in recipe._actions)


def test_recipe_set_changes_nested_options_and_refuses_unknown_ones():
    import pytest

    from qwen25.recipes.tiny import recipe_config
    from qwen25.utils import parse_sets

    base = recipe_config(fast=True)
    key = next(k for k, v in base.items() if isinstance(v, dict) and any(isinstance(x, (int, float)) and
                                                                         not isinstance(x, bool) for x in v.values()))
    inner = next(k for k, x in base[key].items() if isinstance(x, (int, float)) and not isinstance(x, bool))
    changed = recipe_config(fast=True, sets=parse_sets([f"{key}.{inner}=7", "seed=3"]))
    assert changed[key][inner] == 7 and changed["seed"] == 3
    assert {k: v for k, v in changed.items() if k not in (key, "seed")} == \
        {k: v for k, v in base.items() if k not in (key, "seed")}
    with pytest.raises(ValueError, match="no sede"):
        recipe_config(fast=True, sets={"sede": 3})
    with pytest.raises(ValueError, match=f"no {key}.nope"):
        recipe_config(fast=True, sets={f"{key}.nope": 1})
