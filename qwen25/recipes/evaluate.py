"""The recipe's evaluation after a stage: held-out bits per byte, arithmetic accuracy, tool-call validity, passkey.

Every number comes from the library's own harness (`qwen25.evals`): the arithmetic task is a `math` Task whose
`check` is the same function GRPO and rejection sampling use as their reward.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..evals.harness import ModelLM, run_task
from ..evals.passkey import evaluate_passkey, plot_heatmap, results_json
from ..model import load_model
from ..tasks.task import make_task
from ..tokenizer import Tokenizer
from ..tokenizer.chat import encode_chat
from ..tokenizer.tool_calls import parse_tool_calls
from ..utils import write_jsonl

PLAIN_TEMPLATE = "Question: {question}\nSolution:"


def arithmetic_task(problems: list[dict], chat: bool):
    """The held-out arithmetic problems as a math Task: chat prompts (post-trained models) or plain text (base)."""
    spec = {"name": "arithmetic" + ("" if chat else "-plain"), "kind": "math", "chat": chat,
            "generation": {"max_new_tokens": 24, "stop": ["\n"] if not chat else []}}
    if chat:
        spec["template"] = "{question}"
    else:
        spec["template"] = PLAIN_TEMPLATE
    return make_task(spec, examples=[{"question": p["question"], "answer": p["answer"]} for p in problems])


def tool_call_scores(lm: ModelLM, conversations: list[dict], max_new_tokens: int = 48) -> dict:
    """Share of tool prompts answered with a well-formed `<tool_call>` (valid) and with the expected call (correct)."""
    prompts = [encode_chat(lm.tokenizer, c["messages"][:1], tools=c["tools"], add_generation_prompt=True).ids
               for c in conversations]
    outputs = lm.generate_ids(prompts, max_new_tokens=max_new_tokens)
    valid = correct = 0
    for conv, text in zip(conversations, outputs):
        parsed = parse_tool_calls(text)
        if parsed.tool_calls and not parsed.errors:
            valid += 1
            call = parsed.tool_calls[0]
            correct += (call.name, call.arguments) == (conv["call"]["name"], conv["call"]["arguments"])
    return {"tool_call_valid": valid / len(conversations), "tool_call_correct": correct / len(conversations)}


ANSWER_ROOM = 8  # tokens: the answer " K." is at most 7 (a space, five digits, a full stop)


def passkey_scores(model, tokenizer, base_len: int, multiples: list[int], variants: dict[str, dict],
                   out_dir: Path, trials: int = 2) -> dict:
    """Passkey accuracy at base_len x each multiple, for each inference variant (config changes); per variant a heat
    map (passkey_NAME.png) and every prompt's result (passkey_NAME.jsonl: length, depth, key, output, correct).
    A prompt at k x base_len has k * base_len - ANSWER_ROOM tokens: prompt and answer fit in the context (at 1x,
    a prompt of the full context would put the answer past every position phase 1 trained)."""
    metrics = {}
    lengths = [base_len * m - ANSWER_ROOM for m in multiples]
    for name, changes in variants.items():
        with torch.inference_mode(), model.rope_settings(**(changes or {})):
            results = evaluate_passkey(model, tokenizer, lengths, [0.0, 0.25, 0.5, 0.75, 1.0], trials=trials,
                                       seed=1, batch_size=10)
        for m, n in zip(multiples, lengths):
            cell = [r for r in results if r.length == n]
            metrics[f"passkey_{m}x_{name}"] = sum(r.correct for r in cell) / len(cell)
        plot_heatmap(results, out_dir / f"passkey_{name}.png", title=f"passkey, {name}")
        write_jsonl(out_dir / f"passkey_{name}.jsonl", results_json(results))
    return metrics


def evaluate_stage(model_dir: str | Path, data: dict, out_dir: Path, passkey: dict | None = None,
                   plain: bool = False, chat: bool = True) -> dict:
    """All recipe metrics of one checkpoint; `data` holds the held-out sets, `passkey` the grid (or None)."""
    model = load_model(model_dir, dtype="fp32")
    tokenizer = Tokenizer.from_dir(model_dir)
    lm = ModelLM(model, tokenizer, batch_size=16)
    metrics = {}
    ppl = run_task(make_task({"name": "heldout", "kind": "perplexity"}, examples=data["heldout"]), lm,
                   progress=False)
    metrics["heldout_bits_per_byte"] = ppl.metrics["bits_per_byte"]
    if plain:
        metrics["arith_acc_plain"] = run_task(arithmetic_task(data["arith_test"], chat=False), lm,
                                              progress=False).metrics["acc"]
    if chat:
        metrics["arith_acc"] = run_task(arithmetic_task(data["arith_test"], chat=True), lm,
                                        progress=False).metrics["acc"]
        metrics.update(tool_call_scores(lm, data["tool_test"]))
    if passkey:
        metrics.update(passkey_scores(model, tokenizer, passkey["base_len"], passkey["multiples"],
                                      passkey["variants"], out_dir, passkey.get("trials", 2)))
    return metrics


def sample_generations(model_dir: str | Path, prompts: list[tuple[str, str]], out: Path,
                       max_new_tokens: int = 40) -> dict:
    """Greedy continuations of (what, prompt text) pairs, written to out/samples.json (the report shows them)."""
    import json

    model = load_model(model_dir, dtype="fp32")
    tokenizer = Tokenizer.from_dir(model_dir)
    lm = ModelLM(model, tokenizer, batch_size=len(prompts))
    outputs = lm.generate_ids([tokenizer.encode(p, allowed_special="none") for _, p in prompts],
                              max_new_tokens=max_new_tokens)
    samples = [{"what": what, "prompt": prompt, "output": text} for (what, prompt), text in zip(prompts, outputs)]
    (out / "samples.json").write_text(json.dumps(samples, indent=1))
    return {"metrics": {"samples": len(samples)}}
