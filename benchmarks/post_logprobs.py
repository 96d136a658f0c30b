"""Completion log-probabilities, the hot path of DPO reference scoring and GRPO: ours (qwen25.post.logprobs.
token_logprobs) vs TRL's selective_log_softmax, same logits, same process; checks they agree, prints the ratio.

    python benchmarks/post_logprobs.py [--batch 4 --seq 512 --vocab 151936 --threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_line, timed  # noqa: E402

from qwen25.post.logprobs import token_logprobs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151936)  # Qwen2.5's padded vocabulary
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from trl.trainer.utils import selective_log_softmax

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(args.batch, args.seq, args.vocab, generator=g) * 3).to(dtype)
        targets = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        ours = token_logprobs(logits, targets)
        theirs = selective_log_softmax(logits, targets).float()
        # bf16: TRL's log_softmax stays in bf16 (rounding ~0.03 at these magnitudes); ours computes in fp32.
        exact = torch.gather(logits.float().log_softmax(-1), -1, targets[..., None])[..., 0]
        err_ours, err_theirs = (ours - exact).abs().max().item(), (theirs - exact).abs().max().item()
        t_ours = timed(lambda: token_logprobs(logits, targets), args.repeat)
        t_theirs = timed(lambda: selective_log_softmax(logits, targets), args.repeat)
        tokens = args.batch * args.seq
        name = str(dtype).removeprefix("torch.")
        results[name] = {"qwen25_tok_s": tokens / t_ours, "trl_tok_s": tokens / t_theirs, "ratio": t_theirs / t_ours,
                         "max_err_qwen25": err_ours, "max_err_trl": err_theirs}
        print(f"{name:>9}: qwen25 {tokens / t_ours:10,.0f} tok/s  TRL {tokens / t_theirs:10,.0f} tok/s  "
              f"ratio {t_theirs / t_ours:.2f}x  max |err| vs fp32 log_softmax: qwen25 {err_ours:.1e}, "
              f"TRL {err_theirs:.1e}")
    print(result_line("post_logprobs", batch=args.batch, seq=args.seq, vocab=args.vocab, threads=args.threads,
                      **results))


if __name__ == "__main__":
    main()
