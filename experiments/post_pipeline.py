"""The report's post-training pipeline in miniature, on a task the script generates: SFT -> rejection sampling
(a math Task as the verifier) -> DPO with OnDARE -> GRPO, on the tiny preset with a byte-level tokenizer (no
merges, Qwen's control tokens). Prints held-out accuracy (greedy, and sampled at T=1) after every stage, writes
out/pipeline.png, and a JSON line last.

    python experiments/post_pipeline.py [--out runs/post-pipeline] [--sft-steps 300]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "benchmarks")]
from common import result_line  # noqa: E402

from qwen25.tasks.task import make_task  # noqa: E402
from qwen25.generation import SamplingParams, generate  # noqa: E402
from qwen25.model import save_model  # noqa: E402
from qwen25.post.dpo import DPOConfig, train_dpo  # noqa: E402
from qwen25.post.grpo import GRPOConfig, train_grpo  # noqa: E402
from qwen25.post.rejection import RejectionConfig, rejection_sample  # noqa: E402
from qwen25.post.runner import load_causal_lm  # noqa: E402
from qwen25.utils import read_jsonl  # noqa: E402
from qwen25.post.sft import SFTConfig, train_sft  # noqa: E402
from qwen25.tokenizer import train_tokenizer  # noqa: E402
from qwen25.tokenizer.chat import encode_chat  # noqa: E402

def problems(n: int, seed: int, max_b: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b = int(torch.randint(0, 10, (), generator=g)), int(torch.randint(0, max_b + 1, (), generator=g))
        out.append({"question": f"{a}+{b}", "answer": str((a + b) % 10)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/post-pipeline")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--max-b", type=int, default=2)
    parser.add_argument("--dpo-lr", type=float, default=2e-5)
    parser.add_argument("--merge", default="dare", choices=["none", "dare", "ties"])
    parser.add_argument("--merge-weight", type=float, default=1e-4)
    parser.add_argument("--grpo-lr", type=float, default=1e-3)
    parser.add_argument("--grpo-steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    tok = train_tokenizer(["0123456789+"], vocab_size=256)  # no merges: 256 byte tokens + the control tokens
    im_end = tok.im_end_id
    task = make_task({"name": "digits", "kind": "math", "chat": True, "system": "Add.", "template": "{question}"},
                     examples=problems(200, 0, args.max_b))
    held_out = make_task({"name": "digits", "kind": "math", "chat": True, "system": "Add.", "template": "{question}"},
                         examples=problems(100, 1, args.max_b))

    def accuracy(model, samples: int = 0) -> float:
        """Greedy accuracy on the held-out chats, or (samples > 0) the mean reward of samples at temperature 1
        (what GRPO optimises)."""
        rows = held_out.rl_examples()
        prompts = [encode_chat(tok, r["prompt"], add_generation_prompt=True).ids for r in rows]
        params = SamplingParams(max_new_tokens=2, eos_token_ids=[im_end])
        if samples:
            prompts, rows = [p for p in prompts for _ in range(samples)], [r for r in rows for _ in range(samples)]
            params = SamplingParams(temperature=1.0, max_new_tokens=2, eos_token_ids=[im_end], seed=0)
        outs = generate(model.eval(), prompts, params, len(tok))
        texts = [tok.decode([t for t in o if t != im_end]) for o in outs]
        return sum(held_out.evaluate(r["example"], t) for r, t in zip(rows, texts)) / len(rows)

    results, sampled = {}, {}

    def record(stage: str, model, note: str = "") -> None:
        results[stage], sampled[stage] = accuracy(model), accuracy(model, samples=4)
        print(f"{stage:<10} greedy accuracy {results[stage]:.2f}  sampled (T=1) {sampled[stage]:.2f}  {note}")

    base = load_causal_lm("tiny", 0)
    save_model(base, out / "base")
    record("base", base)

    sft_data = [{"messages": r["prompt"] + [{"role": "assistant", "content": r["example"]["answer"]}]}
                for r in task.rl_examples()]
    sft = load_causal_lm(str(out / "base"))
    train_sft(SFTConfig(out_dir=str(out / "sft"), model=str(out / "base"), lr=3e-3, steps=args.sft_steps,
                        batch_size=8, seq_len=128, save_every=10**9), sft_data, tok, model=sft)
    record("sft", sft)

    stats = rejection_sample(sft, task.rl_examples(), task.reward_fn(), RejectionConfig(
        out_dir=str(out / "rs"), samples_per_prompt=8, threshold=1.0, pairs_per_prompt=2,
        sampling=SamplingParams(temperature=1.0, max_new_tokens=2, eos_token_ids=[im_end])), tok)
    print(f"rejection  {json.dumps(stats)}")
    pairs = read_jsonl(out / "rs" / "dpo.jsonl")

    dpo = load_causal_lm(str(out / "sft" / "final"))
    train_dpo(DPOConfig(out_dir=str(out / "dpo"), model=str(out / "sft" / "final"), lr=args.dpo_lr, epochs=2,
                        batch_size=8, merge=args.merge, base_model=str(out / "base"), merge_weight=args.merge_weight,
                        merge_keep=0.5, save_every=10**9), pairs, tok, model=dpo)
    record("dpo", dpo, f"({len(pairs)} pairs)")

    grpo = dpo
    metrics = train_grpo(GRPOConfig(out_dir=str(out / "grpo"), model=str(out / "dpo" / "final"), lr=args.grpo_lr,
                                    steps=args.grpo_steps,
                                    queries_per_step=8, group_size=8,
                                    sampling=SamplingParams(temperature=1.0, max_new_tokens=2, eos_token_ids=[im_end]),
                                    beta=0.04, save_every=10**9), task.rl_examples(), task.reward_fn(), tok,
                         model=grpo)
    record("grpo", grpo, f"(last rollout reward {metrics['reward']:.2f})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = torch.arange(len(results)).tolist()
    ax.bar([i - 0.2 for i in x], list(results.values()), 0.4, label="greedy", color="#4c72b0")
    ax.bar([i + 0.2 for i in x], list(sampled.values()), 0.4, label="sampled, T=1", color="#dd8452")
    ax.set_xticks(x, list(results))
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"tiny preset, a+b (b <= {args.max_b}) chats")
    ax.legend(fontsize=8)
    for i, (g, t) in enumerate(zip(results.values(), sampled.values())):
        ax.text(i - 0.2, g + 0.02, f"{g:.2f}", ha="center", fontsize=8)
        ax.text(i + 0.2, t + 0.02, f"{t:.2f}", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pipeline.png", dpi=100)
    print(result_line("post_pipeline", greedy=results, sampled=sampled, rejection=stats, pairs=len(pairs)))


if __name__ == "__main__":
    main()
