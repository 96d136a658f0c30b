"""`qwen25 chat`: driven through its stdin; every reply equals greedy generation on the rendered history."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from serve_fixtures import greedy_reply, write_tiny_chat_checkpoint

from qwen25.generation import SamplingParams
from qwen25.model import load_model
from qwen25.serve.chat_cli import ChatSession, run_chat
from qwen25.generation import Engine
from qwen25.tokenizer import Tokenizer, encode_chat


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = write_tiny_chat_checkpoint(tmp_path_factory.mktemp("chat"), seed=8)
    return path, load_model(path, dtype="fp32"), Tokenizer.from_dir(path)


def _run(checkpoint, lines: list[str], max_new_tokens: int = 7):
    _, model, tok = checkpoint
    session = ChatSession(Engine(model, max_batch=1, max_len=512, vocab_limit=len(tok)), tok,
                          SamplingParams(max_new_tokens=max_new_tokens))
    out, err = io.StringIO(), io.StringIO()
    code = run_chat(session, io.StringIO("".join(line + "\n" for line in lines)), out, err, prompt="")
    return code, out.getvalue(), err.getvalue(), session


def test_history_system_reset_exit(checkpoint):
    _, model, tok = checkpoint
    code, out, err, session = _run(checkpoint, ["Hello there", "And then?", "/system You are terse.", "Hi",
                                                "/reset", "Hi", "/exit", "never read"])
    assert code == 0 and "never read" not in out
    replies = out.splitlines()
    # turn by turn, what the model generates greedily for the conversation so far
    history, expected = [], []
    for system, text in [(None, "Hello there"), (None, "And then?"), ("You are terse.", "Hi"), ("You are terse.", "Hi")]:
        if text == "Hi":
            history = []  # /system and /reset start a fresh conversation
        messages = ([{"role": "system", "content": system}] if system else []) + history + [
            {"role": "user", "content": text}]
        answer, _ = greedy_reply(model, tok, encode_chat(tok, messages, add_generation_prompt=True).ids, 7)
        history = messages[1 if system else 0:] + [{"role": "assistant", "content": answer}]
        expected.append(answer)
    assert "\n".join(replies) == "\n".join(expected)
    assert expected[2] == expected[3]  # /reset kept the system prompt and dropped the history
    assert session.history == history and session.system == "You are terse."
    assert "[history cleared]" in err and "system prompt set" in err and err.count("tokens/s]") == 4


def test_unknown_command_and_end_of_input(checkpoint):
    code, out, err, session = _run(checkpoint, ["/help", "", "Hi"])
    assert code == 0 and "unknown command '/help'" in err
    assert [m["role"] for m in session.history] == ["user", "assistant"]


def test_context_overflow_is_reported_not_fatal(checkpoint):
    _, model, tok = checkpoint
    session = ChatSession(Engine(model, max_batch=1, max_len=128, vocab_limit=len(tok)), tok,
                          SamplingParams(max_new_tokens=4))
    out, err = io.StringIO(), io.StringIO()
    run_chat(session, io.StringIO("word " * 60 + "\n/reset\nHi\n"), out, err, prompt="")
    assert "no longer fits" in err.getvalue() and err.getvalue().count("tokens/s]") == 1
    assert [m["role"] for m in session.history] == ["user", "assistant"]


def test_command_line_over_a_pipe(checkpoint):
    path, model, tok = checkpoint
    proc = subprocess.run([sys.executable, "-m", "qwen25.cli", "chat", "--model", str(path), "--no-sample",
                           "--max-new-tokens", "5"], input="Hello there\n/exit\n", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected, _ = greedy_reply(model, tok, encode_chat(tok, [{"role": "user", "content": "Hello there"}],
                                                       add_generation_prompt=True).ids, 5)
    assert proc.stdout == expected + "\n"
    assert "qwen25 chat" in proc.stderr and "5 tokens" in proc.stderr
