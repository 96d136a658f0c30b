"""Why the tiny recipe's passkey retrieval stops a few hundred tokens back: does the model copy from context?

Passkey retrieval is copying: after "The pass key is", find the key's digits far back and repeat them, one
digit after the other. Transformers do this with induction heads (attend to the token that followed an earlier
occurrence of the current one). This script measures, on the checkpoints of a `qwen25 recipe tiny` run:

1. induction: next-token accuracy on a held-out passage of 40 tokens and on its exact repeat after a gap of
   filler sentences. A model that copies predicts the repeat far better than the first copy;
2. the passkey answer teacher-forced: accuracy on the first digit and on the later ones (each given the
   correct digits before it), per prompt length;
3. where the attention goes (transformers' eager attention on the same weights): for the step that must
   produce the key's first digit, the largest share of one head's attention that lands on the key's digits,
   per layer, with the key near the question and far from it.

    python experiments/passkey_mechanism.py --run runs/recipe-tiny

Prints tables and a JSON line last; with --plot PNG, the induction curves. docs/recipe.md records a run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "benchmarks")]
from common import result_line  # noqa: E402

from qwen25.tasks.passkey import FILLER, passkey_sample, passkey_samples  # noqa: E402
from qwen25.model import load_model  # noqa: E402
from qwen25.tokenizer import Tokenizer  # noqa: E402
from qwen25.utils import read_jsonl  # noqa: E402

STAGES = {"phase1": "pretrain/phase1/final", "phase2a": "pretrain/phase2a/final", "pretrain": "pretrain/phase2/final"}
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]  # the recipe's passkey depths
KEY = 31415  # the key of the attention probe


def is_digit(tok, token: int) -> bool:
    """Whether a token is (one or more) digits, spaces aside."""
    return tok.decode([token]).strip().isdigit()


def induction(model, passages: list[list[int]], filler: list[int], gaps: list[int]) -> dict:
    """{gap: (accuracy on the first copies, accuracy on the repeats)} of greedy next-token predictions."""
    out = {}
    for gap in gaps:
        pad = (filler * (gap // len(filler) + 1))[:gap]
        first = second = 0.0
        for p in passages:
            ids = torch.tensor([p + pad + p])
            with torch.inference_mode():
                pred = model(ids)[0].argmax(-1)
            n = len(p)
            first += (pred[:n - 1] == ids[0, 1:n]).float().mean().item()
            second += (pred[n + gap:-1] == ids[0, n + gap + 1:]).float().mean().item()
        out[gap] = (round(first / len(passages), 3), round(second / len(passages), 3))
    return out


def answer_accuracy(model, tok, length: int, trials: int) -> tuple[float, float]:
    """(first-digit accuracy, later-digit accuracy) of the key, teacher-forced, over DEPTHS x trials prompts."""
    first = later = n_later = 0
    samples = passkey_samples(tok, [length], DEPTHS, trials=trials, seed=2)
    for s in samples:
        answer = tok.encode(f" {s.passkey}")
        digits = [i for i, t in enumerate(answer) if is_digit(tok, t)]
        ids = torch.tensor([s.ids + answer])
        with torch.inference_mode():
            pred = model(ids)[0, len(s.ids) - 1:-1].argmax(-1).tolist()
        hits = [pred[i] == answer[i] for i in digits]
        first += hits[0]
        later += sum(hits[1:])
        n_later += len(hits) - 1
    return round(first / len(samples), 3), round(later / max(n_later, 1), 3)


def attention_on_key(path: Path, tok, lengths: list[int]) -> dict:
    """{(length, depth): [per layer, the largest share of one head's attention on the key's digits]} at the step
    that must produce the first digit (the prompt plus the answer's leading space token)."""
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager").eval()
    out = {}
    for length in lengths:
        for depth in (0.0, 1.0):
            s = passkey_sample(tok, length, depth, KEY)
            answer = tok.encode(f" {KEY}")
            lead = [t for t in answer if not tok.decode([t]).strip()][:1]  # the space before the digits, if any
            ids = s.ids + lead
            digit_pos = [i for i, t in enumerate(ids) if is_digit(tok, t)]
            with torch.inference_mode():
                attn = hf(torch.tensor([ids]), output_attentions=True).attentions
            out[(length, depth)] = [round(a[0, :, -1, digit_pos].sum(-1).max().item(), 2) for a in attn]
    return out


def plot(curves: dict, gaps: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (stage, curve) in enumerate(curves.items()):
        ax.plot(gaps, [curve[g][1] for g in gaps], marker="o", color=f"C{i}", label=f"{stage}: repeat")
        ax.axhline(curve[gaps[0]][0], color=f"C{i}", linestyle=":", label=f"{stage}: first copy")
    ax.set_xlabel("filler tokens between the passage and its repeat")
    ax.set_ylabel("next-token accuracy")
    ax.set_title("Does the model copy from context? (induction)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a `qwen25 recipe tiny` run folder (pre-training finished)")
    p.add_argument("--gaps", default="0,100,200,400,800")
    p.add_argument("--lengths", default="256,512,1024")
    p.add_argument("--passages", type=int, default=8)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--plot", help="write the induction curves to this PNG")
    p.add_argument("--checkpoint", action="append", metavar="NAME=DIR",
                   help="measure these checkpoints instead of the run's three phases (e.g. an ablation seed's "
                        "RUN/ablations/stages/s1_phase2_abf/phase2/final); the last one gets the attention probe")
    args = p.parse_args()
    torch.set_num_threads(2)
    stages = Path(args.run) / "stages"
    tok = Tokenizer.from_dir(stages / "tokenizer")
    text = "\n".join(d["text"] for d in read_jsonl(stages / "corpus" / "heldout.jsonl"))
    tokens = tok.encode(text)
    if len(tokens) < 40 * args.passages:
        raise SystemExit(f"the held-out set has {len(tokens)} tokens, fewer than {args.passages} passages of 40")
    start = min(1000, len(tokens) - 40 * args.passages)  # past the files' opening lines when there is room
    passages = [tokens[start + 40 * i:start + 40 * (i + 1)] for i in range(args.passages)]
    filler = tok.encode(" " + FILLER)
    gaps, lengths = [int(g) for g in args.gaps.split(",")], [int(n) for n in args.lengths.split(",")]

    checkpoints = {name: stages / sub for name, sub in STAGES.items()}
    if args.checkpoint:
        checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    curves, answers = {}, {}
    for stage, path in checkpoints.items():
        model = load_model(path, dtype="fp32").eval()
        curves[stage] = induction(model, passages, filler, gaps)
        answers[stage] = {n: answer_accuracy(model, tok, n, args.trials) for n in lengths}
    print("next-token accuracy, first copy -> repeat after a gap of filler tokens")
    print("| stage | " + " | ".join(f"gap {g}" for g in gaps) + " |\n|---|" + "---|" * len(gaps))
    for stage, curve in curves.items():
        print(f"| {stage} | " + " | ".join(f"{a:.2f} -> {b:.2f}" for a, b in curve.values()) + " |")
    print("\npasskey answer, teacher-forced: first digit / later digits")
    print("| stage | " + " | ".join(f"{n} tokens" for n in lengths) + " |\n|---|" + "---|" * len(lengths))
    for stage, row in answers.items():
        print(f"| {stage} | " + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in row.values()) + " |")
    attention = attention_on_key(Path(list(checkpoints.values())[-1]), tok, lengths)
    print("\npre-trained model, first-digit step: largest share of one head's attention on the key's digits, per layer")
    for (length, depth), shares in attention.items():
        print(f"  {length} tokens, key at depth {depth:.0%} ({'far' if depth == 0 else 'near'}): {shares}")
    if args.plot:
        plot(curves, gaps, Path(args.plot))
    print(result_line("passkey_mechanism", induction={s: {str(g): v for g, v in c.items()} for s, c in curves.items()},
                      answer={s: {str(n): v for n, v in r.items()} for s, r in answers.items()},
                      attention={f"{n}@{d}": v for (n, d), v in attention.items()}))


if __name__ == "__main__":
    main()
