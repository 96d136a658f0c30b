"""Prompt-lookup speculation against plain greedy decoding and transformers' `prompt_lookup_num_tokens`, on the same
weights, one request at a time:

- "quote": prompts where lookup pays. A model of the recipe's shape is first trained here (about a minute) to
  continue a repeated pattern (rows of a random 32-token pattern repeated; a fixed period, which forms in ~200
  steps: see experiments/induction_formation.py), then asked to continue prompts that start repeating a pattern:
  its output quotes the prompt, as a model does when it edits, summarises or quotes a given text.
- "loop": the same shape with random weights on random prompts. Its greedy output falls into short loops after a
  few tokens (a random model's does), so drafts pay here too.
- "miss": the random model again, every draft made wrong on purpose (each token shifted by one): what failed
  drafts cost, with the back-off (a request waits 1, 2, 4, ... 16 steps after a draft rejected at once). The
  bound for free text, where drafts come from chance n-gram repeats and mostly fail.

    python benchmarks/speculative.py [--draft 4] [--prompts 12] [--new 64] [--rounds 3] [--threads 2]

Our side: `Engine(prompt_lookup=k)` vs `Engine()`, outputs checked token for token. transformers: `generate` with
and without `prompt_lookup_num_tokens=k` (its default n-gram size 2). Prints tokens/s (median of alternating
rounds), the speed-ups, draft acceptance, and a JSON line last. A small model decodes in a few milliseconds a step
here, so a step's fixed cost dominates and a speed-up is the steps saved; at the 0.5B shape a step reads every
weight (memory-bound), so verifying k+1 tokens costs about one step there as well.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_line  # noqa: E402

from qwen25.config import ModelConfig  # noqa: E402
from qwen25.generation import Engine, SamplingParams  # noqa: E402
from qwen25.generation.engine import NgramLookup  # noqa: E402
from qwen25.model import save_model  # noqa: E402
from qwen25.model.transformer import CausalLM  # noqa: E402
from qwen25.recipes.tiny import MODEL  # noqa: E402
from qwen25.train.schedule import lr_at  # noqa: E402

VOCAB, PERIOD, ROW = 512, 32, 128


def fresh_model(seed: int) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig(vocab_size=VOCAB, max_position_embeddings=512, **MODEL))
    model.init_weights(seed)
    return model


def train_copier(steps: int, seed: int = 0) -> CausalLM:
    """The recipe's shape trained on rows of a random PERIOD-token pattern repeated (loss on the repeats)."""
    model, g = fresh_model(seed), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, 3e-3, 20, steps)
        x = torch.randint(0, VOCAB, (16, PERIOD), generator=g).repeat(1, ROW // PERIOD + 1)[:, :ROW]
        loss = F.cross_entropy(model(x[:, :-1])[:, PERIOD - 1:].flatten(0, 1), x[:, PERIOD:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"  copier step {step + 1}/{steps}: loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    return model.eval()


def ours(model, prompts, new: int, draft: int, wrong: bool = False) -> tuple[float, list[list[int]], dict]:
    """Seconds to generate for every prompt, one at a time (a fresh engine each: no prefix reuse), outputs, stats.
    wrong: every draft token shifted by one (never the model's choice)."""
    outputs, stats = [], {"draft_tokens": 0, "accepted_draft_tokens": 0, "steps": 0}
    if wrong:
        real = NgramLookup.draft
        NgramLookup.draft = lambda self, k: [(t + 1) % VOCAB for t in real(self, k)]
    start = time.perf_counter()
    for prompt in prompts:
        engine = Engine(model, max_batch=1, max_len=len(prompt) + new + 8, prompt_lookup=draft,
                        prefix_capacity_blocks=0)
        outputs += engine.generate([prompt], SamplingParams(max_new_tokens=new))
        for key in ("draft_tokens", "accepted_draft_tokens"):
            stats[key] += engine.stats[key]
        stats["steps"] += engine.stats["decode_steps"] + engine.stats["speculative_steps"] + 1
    seconds = time.perf_counter() - start
    if wrong:
        NgramLookup.draft = real
    return seconds, outputs, stats


def theirs(hf, prompts, new: int, draft: int) -> tuple[float, list[list[int]]]:
    kwargs = {"prompt_lookup_num_tokens": draft} if draft else {}
    outputs, start = [], time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                              **kwargs)
            outputs.append(out[0, len(prompt):].tolist())
    return time.perf_counter() - start, outputs


def run_case(name: str, model, prompts, args, wrong: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, tmp, dtype="fp32")
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    tokens = len(prompts) * args.new
    rates: dict[str, list[float]] = {k: [] for k in ("ours_greedy", "ours_lookup", "hf_greedy", "hf_lookup")}
    for _ in range(args.rounds):
        t, plain, _ = ours(model, prompts, args.new, 0)
        rates["ours_greedy"].append(tokens / t)
        t, fast, stats = ours(model, prompts, args.new, args.draft, wrong)
        rates["ours_lookup"].append(tokens / t)
        if fast != plain:
            raise SystemExit(f"{name}: prompt-lookup output differs from greedy decoding")
        t, hf_plain = theirs(hf, prompts, args.new, 0)
        rates["hf_greedy"].append(tokens / t)
        if not wrong:  # (transformers' drafts are not made wrong: no comparison)
            t, hf_fast = theirs(hf, prompts, args.new, args.draft)
            rates["hf_lookup"].append(tokens / t)
    med = {k: statistics.median(v) for k, v in rates.items() if v}
    same = sum(a == b for a, b in zip(plain, hf_plain))
    accepted = stats["accepted_draft_tokens"] / max(stats["draft_tokens"], 1)
    print(f"\n{name}: {len(prompts)} prompts x {args.new} tokens, draft {args.draft}; tok/s (median of {args.rounds})")
    for key, value in med.items():
        print(f"  {key:12s} {value:8.1f}")
    print(f"  ours: lookup {med['ours_lookup'] / med['ours_greedy']:.2f}x greedy; {stats['steps']} steps for "
          f"{tokens} tokens; {accepted:.0%} of {stats['draft_tokens']} draft tokens accepted")
    if "hf_lookup" in med:
        print(f"  transformers: lookup {med['hf_lookup'] / med['hf_greedy']:.2f}x greedy;  ours with lookup "
              f"{med['ours_lookup'] / med['hf_lookup']:.2f}x transformers with lookup")
    print(f"  ours greedy {med['ours_greedy'] / med['hf_greedy']:.2f}x transformers greedy; greedy outputs equal to "
          f"transformers' on {same}/{len(prompts)} prompts")
    out = {**{k: round(v, 1) for k, v in med.items()}, "lookup_speedup": round(med["ours_lookup"] /
           med["ours_greedy"], 2), "accepted_fraction": round(accepted, 3), "steps": stats["steps"],
           "equal_to_transformers": same}
    if "hf_lookup" in med:
        out["hf_lookup_speedup"] = round(med["hf_lookup"] / med["hf_greedy"], 2)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", type=int, default=4, help="draft tokens per step (prompt_lookup_num_tokens)")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--new", type=int, default=64, help="tokens generated per prompt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    patterns = [torch.randint(0, VOCAB, (PERIOD,), generator=g).tolist() for _ in range(args.prompts)]
    quote = [p + p[:8] for p in patterns]  # the pattern and the start of its repeat
    free = [torch.randint(0, VOCAB, (PERIOD + 8,), generator=g).tolist() for _ in range(args.prompts)]
    print(f"training the copier ({args.train_steps} steps, recipe shape, vocabulary {VOCAB})")
    results = {"quote": run_case("quote (a trained copier)", train_copier(args.train_steps), quote, args),
               "loop": run_case("loop (random weights)", fresh_model(7).eval(), free, args),
               "miss": run_case("miss (random weights, every draft wrong)", fresh_model(7).eval(), free, args,
                                wrong=True)}
    print(result_line("speculative", draft=args.draft, prompts=args.prompts, new=args.new, rounds=args.rounds,
                      threads=args.threads, results=results))


if __name__ == "__main__":
    main()
