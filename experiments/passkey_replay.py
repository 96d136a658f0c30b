"""Does replayed text keep the tiny recipe's phase 2a from learning passkey retrieval? A side experiment.

Phase 2a of `qwen25 recipe tiny` raises the RoPE base to 1M and trains at phase 1's length on new passkey
documents (answer-only loss) with the phase-1 text replayed, so as not to forget the language. This script
reruns that stage from a run's phase-1 weights with the recipe's own trainer, varying the share of replayed text
and the step layout, then measures held-out bits per byte and passkey retrieval at every depth:

    python experiments/passkey_replay.py --run runs/recipe-tiny --replay 1.0     # the recipe's mix
    python experiments/passkey_replay.py --run runs/recipe-tiny --replay 0.15    # ~5% of the tokens text

`--replay` is the share of the kept + arithmetic documents replayed beside --docs passkey documents (the
recipe's are 12,000 of 80-240 tokens). `--steps/--batch/--lr` lay out the training (the recipe: 1,200 x 8 at
2e-3). Each run takes about 5-6 minutes on 2 cores; docs/recipe.md records the results. Prints one table row per
prompt length and a JSON line last."""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "benchmarks")]
from common import result_line  # noqa: E402
from passkey_length_band import DEPTHS, per_depth  # noqa: E402

from qwen25.data.pack import pack_documents  # noqa: E402
from qwen25.model import load_model  # noqa: E402
from qwen25.recipes.evaluate import evaluate_stage  # noqa: E402
from qwen25.recipes.synthetic import passkey_documents  # noqa: E402
from qwen25.recipes.tiny import kept_documents, passkey_fillers, tokenize_with_loss_masks  # noqa: E402
from qwen25.tokenizer import Tokenizer  # noqa: E402
from qwen25.train.loop import TrainConfig, train  # noqa: E402
from qwen25.utils import read_jsonl  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a `qwen25 recipe tiny` run folder (pre-training's phase 1 done)")
    p.add_argument("--replay", type=float, default=1.0, help="share of the kept + arithmetic documents replayed")
    p.add_argument("--docs", type=int, default=12000, help="passkey documents")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lengths", default="120,248,504")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--out", help="working folder to keep (default: a temporary one, removed at the end)")
    args = p.parse_args()
    if args.out:
        experiment(args, Path(args.out))
    else:
        with tempfile.TemporaryDirectory(prefix="passkey_replay-") as tmp:
            experiment(args, Path(tmp))


def experiment(args: argparse.Namespace, out: Path) -> None:
    """Pack the passkey + replay documents, train phase 2a from phase 1, measure; files go under `out`."""
    torch.set_num_threads(2)
    run = Path(args.run)
    stages = run / "stages"
    tok = Tokenizer.from_dir(stages / "tokenizer")

    text = kept_documents(stages / "data" / "pipeline")
    text += [(d["id"], d["text"]) for d in read_jsonl(stages / "corpus" / "synthetic.jsonl")
             if d["id"].startswith("arith")]
    random.Random(5).shuffle(text)
    replay = text[:round(args.replay * len(text))]
    passkeys = [(f"passkey-retrieval/{i}", t) for i, t in enumerate(
        passkey_documents(args.docs, 11, 0, passkey_fillers(args.seq_len)))]
    docs = passkeys + replay
    ids, masks = tokenize_with_loss_masks(tok, docs)
    passkey_tokens = sum(map(len, ids[:len(passkeys)]))
    replay_tokens = sum(map(len, ids[len(passkeys):]))
    pack_documents(ids, [d[0] for d in docs], out / "shards", args.seq_len, tok.endoftext_id, tok.endoftext_id,
                   len(tok), "best_fit", meta={"seq_len": args.seq_len}, loss_masks=masks)
    share = replay_tokens / (passkey_tokens + replay_tokens)
    print(f"{passkey_tokens:,} passkey tokens, {replay_tokens:,} replayed ({share:.0%})")

    phase1 = stages / "pretrain" / "phase1" / "final"
    start = time.time()
    train(TrainConfig.from_dict({
        "out_dir": str(out / "train"), "model": str(phase1), "init_from": str(phase1), "data": str(out / "shards"),
        "model_overrides": {"rope_theta": 1_000_000.0}, "seq_len": args.seq_len, "steps": args.steps,
        "batch_size": args.batch, "lr": args.lr, "dtype": "fp32", "warmup": 10, "seed": 0, "save_every": 10**6,
        "tensorboard": False, "peak_flops": 1e11}), progress=True)
    seconds = time.time() - start
    final = out / "train" / "final"
    tok.save(final)
    heldout = read_jsonl(stages / "corpus" / "heldout.jsonl")
    bpb = evaluate_stage(final, {"heldout": heldout}, out / "eval", chat=False)["heldout_bits_per_byte"]
    model = load_model(final, dtype="fp32")
    print(f"{args.steps} steps of {args.batch} x {args.seq_len} at lr {args.lr} in {seconds:.0f} s; held-out "
          f"{bpb:.3f} bits per byte; keys right of {args.trials} at depths {DEPTHS}")
    table = {}
    for length in map(int, args.lengths.split(",")):
        table[length] = per_depth(model, tok, length, args.trials)
        print(f"{length:>6} tokens: {table[length]}  {sum(table[length])} of {args.trials * len(DEPTHS)}", flush=True)
    print(result_line("passkey_replay", replay=args.replay, replay_share=round(share, 3), steps=args.steps,
                      batch=args.batch, lr=args.lr, train_s=round(seconds),
                      heldout_bits_per_byte=round(bpb, 4), depths=DEPTHS, per_depth=table))


if __name__ == "__main__":
    main()
