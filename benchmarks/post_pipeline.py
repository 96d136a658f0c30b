"""The report's post-training pipeline in miniature, on a task the script generates: SFT -> rejection sampling
(a math Task as the verifier) -> DPO with OnDARE -> GRPO, on the tiny preset with a byte-level chat tokenizer.
Prints greedy accuracy on held-out "a+b" chats after every stage, writes a PNG, and a JSON line last.

    python benchmarks/post_pipeline.py [--out runs/post-pipeline] [--sft-steps 300]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_line  # noqa: E402

from qwen25.evals.task import make_task  # noqa: E402
from qwen25.generation import SamplingParams, generate  # noqa: E402
from qwen25.model import save_model  # noqa: E402
from qwen25.post.dpo import DPOConfig, train_dpo  # noqa: E402
from qwen25.post.grpo import GRPOConfig, train_grpo  # noqa: E402
from qwen25.post.rejection import RejectionConfig, rejection_sample  # noqa: E402
from qwen25.post.runner import load_causal_lm, read_jsonl  # noqa: E402
from qwen25.post.sft import SFTConfig, train_sft  # noqa: E402
from qwen25.tokenizer.chat import encode_chat  # noqa: E402

CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


class ByteChatTokenizer:
    """UTF-8 bytes are ids 0-255, the ChatML control tokens 256-258 (fits the tiny preset's vocabulary)."""

    def __init__(self):
        self.ids = {t: 256 + i for i, t in enumerate(CONTROL)}
        self.pattern = re.compile("|".join(re.escape(t) for t in CONTROL))

    def __len__(self) -> int:
        return 259

    def encode(self, text: str) -> list[int]:
        out, at = [], 0
        for m in self.pattern.finditer(text):
            out += list(text[at:m.start()].encode()) + [self.ids[m.group()]]
            at = m.end()
        return out + list(text[at:].encode())

    def decode(self, ids) -> str:
        names = {v: k for k, v in self.ids.items()}
        return "".join(names[i] if i in names else bytes([i]).decode(errors="replace") for i in ids)


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
    tok = ByteChatTokenizer()
    im_end = tok.ids["<|im_end|>"]
    task = make_task({"name": "digits", "kind": "math", "chat": True, "system": "Add.", "template": "{question}"},
                     examples=problems(200, 0, args.max_b))
    held_out = make_task({"name": "digits", "kind": "math", "chat": True, "system": "Add.", "template": "{question}"},
                         examples=problems(100, 1, args.max_b))

    def accuracy(model) -> float:
        rows = held_out.rl_examples()
        prompts = [encode_chat(tok, r["prompt"], add_generation_prompt=True).ids for r in rows]
        outs = generate(model.eval(), prompts, SamplingParams(max_new_tokens=2, eos_token_ids=[im_end]), len(tok))
        texts = [tok.decode([t for t in o if t != im_end]) for o in outs]
        return sum(held_out.evaluate(r["example"], t) for r, t in zip(rows, texts)) / len(rows)

    results = {}
    base = load_causal_lm("tiny", 0)
    save_model(base, out / "base")
    results["base"] = accuracy(base)
    print(f"base       accuracy {results['base']:.2f}")

    sft_data = [{"messages": r["prompt"] + [{"role": "assistant", "content": r["example"]["answer"]}]}
                for r in task.rl_examples()]
    sft = load_causal_lm(str(out / "base"))
    train_sft(SFTConfig(out_dir=str(out / "sft"), model=str(out / "base"), lr=3e-3, steps=args.sft_steps,
                        batch_size=8, seq_len=128, save_every=10**9), sft_data, tok, model=sft)
    results["sft"] = accuracy(sft)
    print(f"sft        accuracy {results['sft']:.2f}")

    stats = rejection_sample(sft, task.rl_examples(), task.reward_fn(), RejectionConfig(
        out_dir=str(out / "rs"), samples_per_prompt=8, max_new_tokens=2, temperature=1.0, top_p=1.0, top_k=0,
        eos_ids=[im_end], threshold=1.0, pairs_per_prompt=2), tok)
    print(f"rejection  {json.dumps(stats)}")
    pairs = read_jsonl(out / "rs" / "dpo.jsonl")

    dpo = load_causal_lm(str(out / "sft" / "final"))
    train_dpo(DPOConfig(out_dir=str(out / "dpo"), model=str(out / "sft" / "final"), lr=args.dpo_lr, epochs=2,
                        batch_size=8, merge=args.merge, base_model=str(out / "base"), merge_weight=args.merge_weight,
                        merge_keep=0.5, save_every=10**9), pairs, tok, model=dpo)
    results["dpo"] = accuracy(dpo)
    print(f"dpo        accuracy {results['dpo']:.2f}  ({len(pairs)} pairs)")

    grpo = dpo
    metrics = train_grpo(GRPOConfig(out_dir=str(out / "grpo"), model=str(out / "dpo" / "final"), lr=args.grpo_lr,
                                    steps=args.grpo_steps,
                                    queries_per_step=8, group_size=8, max_new_tokens=2, eos_ids=[im_end],
                                    beta=0.04, save_every=10**9), task.rl_examples(), task.reward_fn(), tok,
                         model=grpo)
    results["grpo"] = accuracy(grpo)
    print(f"grpo       accuracy {results['grpo']:.2f}  (last rollout reward {metrics['reward']:.2f})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(results), list(results.values()), color=["#999", "#4c72b0", "#55a868", "#c44e52"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title(f"tiny preset, a+b (b <= {args.max_b}) chats")
    for i, v in enumerate(results.values()):
        ax.text(i, v + 0.02, f"{v:.2f}", ha="center")
    fig.tight_layout()
    fig.savefig(out / "pipeline.png", dpi=100)
    print(result_line("post_pipeline", **results, rejection=stats, pairs=len(pairs)))


if __name__ == "__main__":
    main()
