"""GRPO training steps, rollouts included: ours (qwen25.post.grpo.train_grpo, rollouts on qwen25.generation.Engine)
vs TRL's GRPOTrainer (plain transformers generation, no vLLM), same process; prints samples/s and the ratio.

    python benchmarks/grpo.py [--hidden 256 --layers 4 --vocab 2048 --queries 4 --group 8 --prompt-len 64
                               --new 64 --steps 2 --rounds 3 --threads 2]

Both load the same random Qwen2 checkpoint (transformers' Qwen2Config, saved to a temporary directory; the
vocabulary is a small byte-level BPE tokenizer trained here on stdlib source, which both read) in fp32 and train
on the same prompts (all exactly --prompt-len tokens) with the same settings: group size --group, --queries
prompts a step (one generation and one optimizer step per step, no reuse), temperature 1, no KL term, the
token-level (DAPO) loss, AdamW with clipping at 1.0, no activation checkpointing (on by default in TRL; ours
never recomputes). Every completion is exactly --new tokens (ours: no eos ids; TRL: min_new_tokens =
max_completion_length), so both sides do the same work. The reward is the share of completion ids in the lower
half of the vocabulary: it varies within a group, so every step is a real update. A step is generation +
rewards + forward and backward + optimizer step (ours: the step loop's `seconds`; TRL: on_step_begin to
on_step_end); generation alone is timed too (ours: `rollout`; TRL: `_generate`). Ours and theirs alternate for
--rounds rounds, each a fresh run of --steps steps from the same weights; samples/s is the median over rounds of
(steps x queries x group) / (sum of step times).
"""

from __future__ import annotations

import argparse
import json
import json.decoder
import json.encoder
import statistics
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_line  # noqa: E402

from qwen25.generation import SamplingParams  # noqa: E402
from qwen25.post import grpo  # noqa: E402
from qwen25.post.grpo import GRPOConfig, rollout, train_grpo  # noqa: E402
from qwen25.tokenizer import train_tokenizer  # noqa: E402


def corpus() -> list[str]:
    """Python source from the standard library: text for the tokenizer and the prompts."""
    return [Path(m.__file__).read_text(encoding="utf-8") for m in (argparse, json.decoder, json.encoder, textwrap)]


def make_prompts(tok, texts: list[str], n: int, length: int) -> list[str]:
    """n texts that the tokenizer encodes to exactly `length` ids (windows of the corpus that round-trip)."""
    out = []
    for text in texts:
        ids = tok(text)["input_ids"]
        for start in range(0, len(ids) - length, length):
            window = tok.decode(ids[start:start + length])
            if len(tok(window)["input_ids"]) == length:
                out.append(window)
            if len(out) == n:
                return out
    raise ValueError(f"the corpus gives only {len(out)} prompts of {length} tokens, {n} needed")


def share_low(completion_ids: list[list[int]], vocab: int) -> list[float]:
    """Reward: the share of completion ids below vocab / 2."""
    return [sum(t < vocab // 2 for t in c) / max(1, len(c)) for c in completion_ids]


def timing(fn, seconds: list[float]):
    """fn, adding the wall-clock seconds of every call to `seconds`."""
    def timed_fn(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)
    return timed_fn


def run_ours(args, model_dir: Path, prompt_ids: list[list[int]], vocab: int, pad_id: int,
             out: Path) -> tuple[float, float]:
    """(seconds of all our steps (the step loop's own timer, from metrics.jsonl), seconds of their rollouts)."""
    cfg = GRPOConfig(out_dir=str(out), model=str(model_dir), lr=1e-6, steps=args.steps, queries_per_step=args.queries,
                     group_size=args.group, sampling=SamplingParams(temperature=1.0, max_new_tokens=args.new),
                     loss_type="token", pad_id=pad_id, chat=False, save_every=10**9, dtype="fp32")
    generation: list[float] = []
    grpo.rollout = timing(rollout, generation)  # train_grpo calls the module's rollout
    try:
        train_grpo(cfg, [{"prompt_ids": p} for p in prompt_ids], lambda p, c, e: share_low(c, vocab), progress=False)
    finally:
        grpo.rollout = rollout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["completion_length"] == args.new for r in rows), "ours: a completion stopped early"
    return sum(r["seconds"] for r in rows), sum(generation)


def run_trl(args, model_dir: Path, tok, prompts: list[str], vocab: int, out: Path) -> tuple[float, float]:
    """(seconds of all TRL's steps (on_step_begin to on_step_end), seconds of their generation (`_generate`))."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback
    from trl import GRPOConfig as TRLConfig, GRPOTrainer

    seconds, generation, lengths = [], [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            seconds.append(time.perf_counter() - self.t0)

    def reward(prompts, completions, completion_ids, **kw):
        lengths.extend(len(c) for c in completion_ids)
        return share_low(completion_ids, vocab)

    cfg = TRLConfig(output_dir=str(out), per_device_train_batch_size=args.queries * args.group,
                    gradient_accumulation_steps=1, num_generations=args.group, max_completion_length=args.new,
                    generation_kwargs={"min_new_tokens": args.new}, max_steps=args.steps, learning_rate=1e-6,
                    temperature=1.0, beta=0.0, loss_type="dapo", max_grad_norm=1.0, bf16=False, use_cpu=True,
                    gradient_checkpointing=False, report_to="none", save_strategy="no", logging_strategy="no",
                    disable_tqdm=True, seed=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, processing_class=tok,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[StepTimer()])
    trainer.remove_callback(PrinterCallback)  # the end-of-training metrics dictionary
    trainer._generate = timing(trainer._generate, generation)
    trainer.train()
    assert set(lengths) == {args.new}, f"TRL: completion lengths {sorted(set(lengths))}, expected {args.new}"
    return sum(seconds), sum(generation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048, help="regular tokens of the trained tokenizer")
    parser.add_argument("--queries", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new", type=int, default=64, help="tokens per completion")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per round and side")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours and TRL")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renamed gradient_checkpointing
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as folder:
        tmp = Path(folder)
        texts = corpus()
        train_tokenizer(texts, vocab_size=args.vocab, out_dir=tmp / "tok")
        tok = AutoTokenizer.from_pretrained(tmp / "tok")
        vocab = len(tok)
        config = Qwen2Config(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                             num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                             num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=4096,
                             tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(tmp / "model")
        prompts = make_prompts(tok, texts, args.queries * args.steps, args.prompt_len)
        prompt_ids = [tok(p)["input_ids"] for p in prompts]
        samples = args.steps * args.queries * args.group
        ours, theirs, gen_ours, gen_trl = [], [], [], []
        for r in range(args.rounds):
            s_ours, g_ours = run_ours(args, tmp / "model", prompt_ids, vocab, tok.pad_token_id, tmp / f"ours{r}")
            s_trl, g_trl = run_trl(args, tmp / "model", tok, prompts, vocab, tmp / f"trl{r}")
            ours.append(samples / s_ours)
            theirs.append(samples / s_trl)
            gen_ours.append(samples / g_ours)
            gen_trl.append(samples / g_trl)
            print(f"round {r + 1}: qwen25 {ours[-1]:6.2f} samples/s ({s_ours:.1f} s, generation {g_ours:.1f} s)  "
                  f"TRL {theirs[-1]:6.2f} samples/s ({s_trl:.1f} s, generation {g_trl:.1f} s)", flush=True)
        mine, peer = statistics.median(ours), statistics.median(theirs)
        print(f"qwen25 {mine:.2f} samples/s  TRL {peer:.2f} samples/s  ratio {mine / peer:.2f}x  "
              f"({args.steps} steps x {args.queries} prompts x {args.group} samples of {args.new} tokens a round, "
              f"medians of {args.rounds} rounds)")
        gen_mine, gen_peer = statistics.median(gen_ours), statistics.median(gen_trl)
        print(f"generation alone: qwen25 {gen_mine:.2f} samples/s  TRL {gen_peer:.2f} samples/s  "
              f"ratio {gen_mine / gen_peer:.2f}x")
    print(result_line("grpo", hidden=args.hidden, layers=args.layers, vocab=vocab, queries=args.queries,
                      group=args.group, prompt_len=args.prompt_len, new=args.new, steps=args.steps,
                      rounds=args.rounds, threads=args.threads, qwen25_samples_s=round(mine, 3),
                      trl_samples_s=round(peer, 3), ratio=round(mine / peer, 3),
                      generation_ratio=round(gen_mine / gen_peer, 3),
                      qwen25_rounds=[round(x, 3) for x in ours], trl_rounds=[round(x, 3) for x in theirs]))


if __name__ == "__main__":
    main()
