"""What serving's precisions cost in accuracy: a trained checkpoint's next-token loss and greedy choices when it
decodes held-out text token by token, as `qwen25 serve` runs it in fp32, bf16, --int8 and --w8a8 (with bf16, and with
fp32 as an AVX2 CPU serves them), and --int4 (fp32; the output layer 8-bit, or 4-bit too).

    python experiments/quant_accuracy.py --model DIR --text FILE.jsonl [--docs 6] [--tokens 200] [--variants a,b]

Each model is prepared as `qwen25 serve` prepares it (prepare_for_decode) and fed the text one token at a time
through its KV cache, so every matmul takes the decode path (for --w8a8: int8 activations). Prints the mean
negative log-likelihood per token (nats) and the share of positions whose argmax equals the fp32 model's, and
a JSON line last. FILE.jsonl holds {"text": ...} lines (the recipe writes stages/corpus/heldout.jsonl).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "benchmarks")]
from common import result_line  # noqa: E402

from qwen25.model import KVCache, load_model  # noqa: E402
from qwen25.serve.quant import prepare_for_decode  # noqa: E402
from qwen25.tokenizer import Tokenizer  # noqa: E402

# name: (dtype, prepare_for_decode flags); the fp32 int8 variants are the AVX2 CPU's paths (cpu_kernels_avx2.c)
VARIANTS = {"fp32": ("fp32", {}), "bf16": ("bf16", {}), "int8": ("bf16", {"int8": True}),
            "w8a8": ("bf16", {"w8a8": True}), "fp32+int8": ("fp32", {"int8": True}),
            "fp32+w8a8": ("fp32", {"w8a8": True}), "fp32+int4": ("fp32", {"int4": True}),
            "fp32+int4/4": ("fp32", {"int4": True, "head_bits": 4})}  # int4/4: the output layer 4-bit too


def decode_logits(model, ids: list[int]) -> torch.Tensor:
    """fp32 logits (len(ids) - 1, vocab) predicting ids[1:], one decode step per token."""
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, 1, len(ids), dtype=dtype)
    with torch.no_grad():
        return torch.stack([model(torch.tensor([[t]]), cache=cache)[0, -1].float() for t in ids[:-1]])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (weights + tokenizer files)")
    ap.add_argument("--tokenizer", help="tokenizer directory, if not the model's")
    ap.add_argument("--text", required=True, help="JSONL file of {'text': ...} documents")
    ap.add_argument("--docs", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=200, help="tokens per document (at most)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)} "
                                                                   "(fp32 is always run: the others are compared with it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_dir(args.tokenizer or args.model)
    with open(args.text) as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()][:args.docs]
    ids = [tokenizer.encode(text, allowed_special="none")[:args.tokens] for text in docs]
    ids = [d for d in ids if len(d) > 1]
    if not ids:
        raise SystemExit(f"{args.text}: no document with two or more tokens")
    targets = torch.tensor([t for d in ids for t in d[1:]])
    logits = {}
    names = ["fp32"] + [v for v in args.variants.split(",") if v and v != "fp32"]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    for name in names:
        dtype, flags = VARIANTS[name]
        model = load_model(args.model, dtype=dtype)
        print(f"[{name}] {prepare_for_decode(model, **flags)}")
        logits[name] = torch.cat([decode_logits(model, d) for d in ids])
        del model
    results = {}
    for name, lg in logits.items():
        nll = F.cross_entropy(lg, targets).item()
        agree = (lg.argmax(-1) == logits["fp32"].argmax(-1)).float().mean().item()
        results[name] = dict(nll=round(nll, 4), top1_agreement_with_fp32=round(agree, 4))
        print(f"{name:11s} nll/token {nll:.4f}   greedy choice equal to fp32's {agree:.2%}")
    print(f"{len(targets)} predicted tokens in {len(ids)} documents")
    print(result_line("quant_accuracy", model=str(args.model), tokens=len(targets), results=results))


if __name__ == "__main__":
    main()
