"""Synthetic task data for the miniature recipe: verifiable arithmetic word problems, tool-call conversations and
passkey documents. Everything is a pure function of a seed, so every machine builds the same data offline.

Arithmetic problems are the recipe's "math": a question in words, a one-line worked solution ending in
"The answer is N.", and the integer answer, which `qwen25.verifiers.math` checks (as the report's math
verifier does). Tool-call conversations follow the Qwen2.5 chat format (OpenAI-shaped `tool_calls`, a tool
result, a final answer that uses it); the check is that the model emits a well-formed `<tool_call>` with the
right name and arguments.
"""

from __future__ import annotations

import json
import random

from ..tasks.passkey import passkey_text

NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivan", "Jade", "Kai", "Lena", "Milo", "Nora",
         "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara")
ITEMS = ("apples", "books", "coins", "pencils", "stamps", "marbles", "cards", "shells", "stickers", "cookies")

# (question template, solution template, answer) per operation; a, b are the operands.
_OPERATIONS = {
    "add": ("{name} has {a} {item}. {other} gives {name} {b} more {item}. How many {item} does {name} have now?",
            "{a} + {b} = {r}. The answer is {r}.", lambda a, b: a + b),
    "sub": ("{name} has {a} {item} and gives {b} of them to {other}. How many {item} does {name} have left?",
            "{a} - {b} = {r}. The answer is {r}.", lambda a, b: a - b),
    "mul": ("{name} buys {a} boxes with {b} {item} in each box. How many {item} does {name} buy?",
            "{a} * {b} = {r}. The answer is {r}.", lambda a, b: a * b),
}


def arithmetic_problem(rng: random.Random, max_operand: int = 20) -> dict:
    """One word problem: {"question", "solution", "answer"} with an integer answer >= 0."""
    op = rng.choice(sorted(_OPERATIONS))
    question, solution, fn = _OPERATIONS[op]
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    if op == "sub" and b > a:
        a, b = b, a
    if op == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
    r = fn(a, b)
    fill = dict(name=name, other=other, item=item, a=a, b=b, r=r)
    return {"question": question.format(**fill), "solution": solution.format(**fill), "answer": str(r),
            "operation": op}


def arithmetic_problems(n: int, seed: int, exclude: set[str] | None = None, max_operand: int = 20) -> list[dict]:
    """n distinct problems (by question text), none of whose questions is in `exclude` (held-out sets)."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out = []
    for _ in range(n * 50):
        if len(out) == n:
            break
        p = arithmetic_problem(rng, max_operand)
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct problems for n={n}; raise max_operand")
    return out


def wrong_solution(problem: dict, rng: random.Random, step_only: bool = False) -> str:
    """The worked solution with a wrong result: a near miss (off by 1-3 or 10) in the equation and the final answer,
    or (step_only) in the equation alone, so the final answer is right but the step that reaches it is not."""
    answer = int(problem["answer"])
    wrong = answer + rng.choice([d for d in (-10, -3, -2, -1, 1, 2, 3, 10) if answer + d >= 0])
    solution = problem["solution"].replace(f"= {answer}.", f"= {wrong}.")
    return solution if step_only else solution.replace(f"is {answer}.", f"is {wrong}.")


def problem_document(problem: dict) -> str:
    """A problem as pre-training text (question, then the worked solution)."""
    return f"Question: {problem['question']}\nSolution: {problem['solution']}"


def problem_messages(problem: dict, with_answer: bool = True) -> list[dict]:
    """A problem as a chat (user question, assistant worked solution) for SFT; without the answer for prompting."""
    messages = [{"role": "user", "content": problem["question"]}]
    if with_answer:
        messages.append({"role": "assistant", "content": problem["solution"]})
    return messages


# ---- tool calls ---------------------------------------------------------------------------------------------------
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}},
]
CITIES = ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Rome", "Seoul", "Perth")
WEATHER = ("sunny", "rainy", "cloudy", "windy", "snowy")


def tool_conversation(rng: random.Random) -> dict:
    """{"messages", "tools", "call"}: a user request, the assistant's tool call, the result and the answer.

    `call` is the expected call {"name", "arguments"}: the prompt for evaluation is the messages up to (not
    including) the assistant's tool call.
    """
    if rng.random() < 0.5:
        city, weather = rng.choice(CITIES), rng.choice(WEATHER)
        call = {"name": "get_weather", "arguments": {"city": city}}
        user = f"What is the weather in {city}?"
        result = json.dumps({"city": city, "weather": weather})
        answer = f"It is {weather} in {city}."
    else:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        call = {"name": "add", "arguments": {"a": a, "b": b}}
        user = f"Use the tool to add {a} and {b}."
        result = json.dumps({"result": a + b})
        answer = f"{a} + {b} = {a + b}."
    messages = [{"role": "user", "content": user},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
                {"role": "tool", "content": result},
                {"role": "assistant", "content": answer}]
    return {"messages": messages, "tools": TOOLS, "call": call}


def tool_conversations(n: int, seed: int) -> list[dict]:
    """n tool-call conversations."""
    rng = random.Random(seed)
    return [tool_conversation(rng) for _ in range(n)]


# ---- passkey documents --------------------------------------------------------------------------------------------
def passkey_document(rng: random.Random, fillers: int) -> str:
    """A passkey prompt followed by its answer: pre-training text that teaches retrieval at a given length."""
    key = rng.randint(1, 50_000)
    before = rng.randint(0, fillers)
    return passkey_text(key, before, fillers - before) + f" {key}."


def passkey_answer_start(document: str) -> int:
    """Where a passkey document's answer (" K.") begins: the loss goes there only (the rest is context)."""
    return document.rindex(" ")


def passkey_documents(n: int, seed: int, min_fillers: int = 1, max_fillers: int = 20) -> list[str]:
    """n passkey documents with between min_fillers and max_fillers filler sentences."""
    rng = random.Random(seed)
    return [passkey_document(rng, rng.randint(min_fillers, max_fillers)) for _ in range(n)]


SPAM = ("BUY NOW!!! Best price on {item}, free shipping, limited offer, order today and save {n}% on every "
        "{item}. Click here, click here, deal of the day, discount coupon, checkout now, sale sale sale!")


def spam_text(rng: random.Random, sentences: int = 5) -> str:
    """A low-quality web document (the kind the quality filter must drop): `sentences` spam sentences."""
    return " ".join(SPAM.format(item=rng.choice(["shoes", "phones", "watches"]), n=rng.randint(10, 90))
                    for _ in range(sentences))
