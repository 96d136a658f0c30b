"""Each post-training stage runs a few steps on the tiny preset and its metric moves the right way; metrics go to
metrics.jsonl; a run resumed from a checkpoint ends exactly where an uninterrupted one does.

Numbers the tests hold (tiny preset, seeds fixed): SFT loss on its own data falls by more than half in 30 steps
and packing never changes an example's loss; the reward model ranks held-out separable pairs with accuracy
>= 0.9 (0.5 is chance); DPO's held-out preference accuracy ends >= 0.9 with margins growing; GRPO's mean reward
on "answer with the digit 7" rises from ~0.06 (1/16 by chance) to >= 0.3 within 8 steps.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from post_fixtures import arithmetic_chats, byte_tokenizer, one_thread, separable_pairs  # noqa: F401

from qwen25.generation import SamplingParams
from qwen25.post.dpo import DPOConfig, train_dpo
from qwen25.post.grpo import GRPOConfig, prioritise, train_grpo
from qwen25.post.reward import RMConfig, load_reward_model, reward_fn, train_reward_model
from qwen25.post.runner import load_causal_lm
from qwen25.post.sft import SFTConfig, encode_sft_example, pack, packed_loss, train_sft


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sft_loss_falls_and_packing_keeps_each_examples_loss(tmp_path):
    tok = byte_tokenizer()
    data = arithmetic_chats(64, 0)
    encoded = [encode_sft_example(e, tok) for e in data]
    model = load_causal_lm("tiny", 0)
    tokens, masks, docs = pack(encoded, 128)
    assert tokens.shape[0] < len(data) / 2  # several examples per row
    with torch.no_grad():
        packed, n = packed_loss(model, tokens, masks, docs)
        alone = [packed_loss(model, *pack([e], 64)) for e in encoded]
    assert n == sum(k for _, k in alone)
    assert packed.item() == pytest.approx(sum(loss.item() * k for loss, k in alone) / n, rel=1e-5)

    cfg = SFTConfig(out_dir=str(tmp_path / "sft"), model="tiny", lr=3e-3, steps=30, batch_size=4, seq_len=128)
    train_sft(cfg, data, tok, model=model, progress=False)
    with torch.no_grad():
        after, _ = packed_loss(model, tokens, masks, docs)
    rows = metrics(tmp_path / "sft")
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert after.item() < 0.5 * packed.item(), f"SFT loss {packed.item():.3f} -> {after.item():.3f}"
    assert {"loss", "lr", "grad_norm", "assistant_tokens", "tokens_per_s"} <= set(rows[-1])
    assert rows[0]["lr"] == pytest.approx(3e-3) and rows[-1]["lr"] < rows[0]["lr"]  # decays toward 0.1 * lr
    assert (tmp_path / "sft" / "final" / "model.safetensors").is_file() and (tmp_path / "sft" / "metrics.png").is_file()


@pytest.mark.slow
def test_sft_raises_arithmetic_accuracy(tmp_path):
    """Greedy accuracy on held-out "a+b" chats (b in {0, 1}) goes from 0 to >= 0.35 (0.48 measured) in 300 steps."""
    from qwen25.generation import SamplingParams, generate
    from qwen25.tokenizer.chat import encode_chat

    tok = byte_tokenizer()
    train, test = arithmetic_chats(200, 0, max_b=1), arithmetic_chats(50, 1, max_b=1)

    def accuracy(model):
        prompts = [encode_chat(tok, e["messages"][:-1], add_generation_prompt=True).ids for e in test]
        outs = generate(model.eval(), prompts, SamplingParams(max_new_tokens=1))
        return sum(tok.decode(o) == e["answer"] for o, e in zip(outs, test)) / len(test)

    model = load_causal_lm("tiny", 0)
    before = accuracy(model)
    cfg = SFTConfig(out_dir=str(tmp_path / "sft"), model="tiny", lr=3e-3, steps=300, batch_size=8, seq_len=128,
                    save_every=1000)
    train_sft(cfg, train, tok, model=model, progress=False)
    after = accuracy(model)
    assert before <= 0.2 and after >= 0.35, (before, after)


def test_packing_drops_examples_cut_before_their_reply():
    kept, cut = ([1, 2, 3, 4], [0, 0, 1, 1]), ([5, 6, 7, 8, 9, 10], [0, 0, 0, 0, 0, 1])
    with pytest.warns(UserWarning, match="1 example"):
        tokens, masks, docs = pack([kept, cut], seq_len=5)
    assert tokens.tolist() == [[1, 2, 3, 4, 0]] and masks.sum() == 2
    with pytest.raises(ValueError, match="no SFT example"):
        pack([cut], seq_len=5)


def test_long_context_sft_is_two_phases(tmp_path):
    """Phase 1 on short rows; phase 2 starts from phase 1's final/ with longer rows mixing short and long chats."""
    tok = byte_tokenizer()
    short = arithmetic_chats(16, 0)
    long = [{"messages": [{"role": "user", "content": "x" * 150}, {"role": "assistant", "content": "y" * 40}]}] * 4
    one = SFTConfig(out_dir=str(tmp_path / "p1"), model="tiny", lr=1e-3, steps=2, batch_size=2, seq_len=64)
    train_sft(one, short, tok, progress=False)
    two = SFTConfig(out_dir=str(tmp_path / "p2"), model=str(tmp_path / "p1" / "final"), lr=1e-3, steps=2,
                    batch_size=2, seq_len=256)
    train_sft(two, short + long, tok, progress=False)
    assert json.loads((tmp_path / "p2" / "stage_config.json").read_text())["model"].endswith("p1/final")
    assert metrics(tmp_path / "p2")[-1]["tokens"] == 2 * 256
    # Unpacked rows (no dense document mask, for very long rows) give each example the same loss as packing.
    encoded = [encode_sft_example(e, tok) for e in short[:3]]
    model = load_causal_lm("tiny", 0)
    from qwen25.post.logprobs import pad_batch
    from qwen25.post.sft import unpacked_loss

    with torch.no_grad():
        packed, n = packed_loss(model, *pack(encoded, 256))
        alone, m = unpacked_loss(model, pad_batch([e[0] for e in encoded], [e[1] for e in encoded]))
    assert n == m and alone.item() == pytest.approx(packed.item(), rel=1e-5)
    three = SFTConfig(out_dir=str(tmp_path / "p3"), model="tiny", lr=1e-3, steps=2, batch_size=2, seq_len=256,
                      pack=False)
    train_sft(three, short + long, tok, progress=False)
    assert metrics(tmp_path / "p3")[-1]["tokens"] < 2 * 256


def test_sft_recipe_defaults_are_the_reports():
    cfg = SFTConfig()
    assert (cfg.lr, cfg.lr * cfg.min_lr_ratio, cfg.weight_decay, cfg.clip, cfg.epochs, cfg.seq_len) == \
        (7e-6, pytest.approx(7e-7), 0.1, 1.0, 2.0, 32768)
    assert (DPOConfig().lr, DPOConfig().epochs, GRPOConfig().group_size) == (7e-7, 1.0, 8)
    with pytest.raises(ValueError, match="unknown SFTConfig option"):
        SFTConfig.from_dict({"learning_rate": 1})


def test_reward_model_accuracy_rises_on_separable_pairs(tmp_path):
    train, held = separable_pairs(64, 1), separable_pairs(32, 2)
    cfg = RMConfig(out_dir=str(tmp_path / "rm"), model="tiny", lr=3e-3, steps=20, batch_size=8)
    rm, result = train_reward_model(cfg, train, eval_examples=held, progress=False)
    rows = metrics(tmp_path / "rm")
    assert sum(r["accuracy"] for r in rows[:3]) / 3 < 0.9
    assert result["eval/accuracy"] >= 0.9, result
    # Saved as Qwen2ForSequenceClassification; the scoring API gives the same rewards after reloading.
    loaded = load_reward_model(tmp_path / "rm" / "final")
    prompts, completions = [held[0]["prompt_ids"]] * 2, [held[0]["chosen_ids"], held[0]["rejected_ids"]]
    scores = reward_fn(loaded)(prompts, completions, None)
    assert scores == pytest.approx(reward_fn(rm)(prompts, completions, None), abs=1e-5)
    assert scores[0] > scores[1]


def test_reward_model_margins_enter_the_loss(tmp_path):
    """Pairs with a "margin" train on -log sigmoid(r_w - r_l - margin): a larger first-step loss than without."""
    plain = separable_pairs(16, 1)
    with_margin = [{**p, "margin": 2.0} for p in plain]
    cfg = dict(model="tiny", lr=1e-3, steps=1, batch_size=8)
    train_reward_model(RMConfig(out_dir=str(tmp_path / "a"), **cfg), plain, progress=False)
    train_reward_model(RMConfig(out_dir=str(tmp_path / "b"), **cfg), with_margin, progress=False)
    a, b = metrics(tmp_path / "a")[0], metrics(tmp_path / "b")[0]
    assert a["margin"] == pytest.approx(b["margin"])  # same model, same pairs: the margin only shifts the loss
    assert b["loss"] > a["loss"] + 0.5


def test_reward_model_equals_transformers_sequence_classification(tmp_path):
    """Our saved reward model, loaded by transformers as Qwen2ForSequenceClassification, scores the same."""
    transformers = pytest.importorskip("transformers")
    from qwen25.post.reward import RewardModel, save_reward_model

    torch.manual_seed(0)
    rm = RewardModel(load_causal_lm("tiny", 3))
    save_reward_model(rm, tmp_path / "rm")
    hf = transformers.Qwen2ForSequenceClassification.from_pretrained(tmp_path / "rm", pad_token_id=0).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    with torch.no_grad():
        theirs = hf(ids, attention_mask=(ids != 0).long()).logits[:, 0]
        ours = rm(ids, torch.tensor([5, 3]))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_dpo_margins_grow_and_held_out_accuracy_exceeds_chance(tmp_path):
    train, held = separable_pairs(64, 1), separable_pairs(32, 2)
    cfg = DPOConfig(out_dir=str(tmp_path / "dpo"), model="tiny", lr=1e-3, steps=12, batch_size=8)
    result = train_dpo(cfg, train, eval_examples=held, progress=False)
    rows = metrics(tmp_path / "dpo")
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert rows[-1]["rewards/margins"] > 0.1 and rows[-1]["loss"] < rows[0]["loss"]
    assert result["eval/rewards/accuracies"] >= 0.9, result
    assert json.loads((tmp_path / "dpo" / "eval.json").read_text())["pairs"] == 32


def _save_base_and_sft(tmp_path):
    """tmp_path/base (a tiny model) and tmp_path/sft (the same weights, nudged): the pair online merging needs."""
    from qwen25.model import save_model

    base, sft = load_causal_lm("tiny", 0), load_causal_lm("tiny", 0)
    with torch.no_grad():
        for p in sft.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_model(base, tmp_path / "base")
    save_model(sft, tmp_path / "sft")


def test_dpo_with_online_merging_and_without_precomputed_reference(tmp_path):
    """OnDARE DPO from an "SFT" checkpoint with its base: runs, learns, and matches precomputed-reference DPO
    when the reference is kept as a model instead."""
    _save_base_and_sft(tmp_path)
    train = separable_pairs(32, 1)
    common = dict(model=str(tmp_path / "sft"), lr=1e-3, steps=6, batch_size=8)
    a = train_dpo(DPOConfig(out_dir=str(tmp_path / "a"), **common), train, progress=False)
    b = train_dpo(DPOConfig(out_dir=str(tmp_path / "b"), precompute_ref=False, **common), train, progress=False)
    assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-4)
    merged = train_dpo(DPOConfig(out_dir=str(tmp_path / "m"), merge="dare", base_model=str(tmp_path / "base"),
                                 merge_weight=0.01, merge_keep=0.5, **common), train, progress=False)
    assert merged["rewards/margins"] > 0
    with pytest.raises(ValueError, match="base_model"):
        train_dpo(DPOConfig(out_dir=str(tmp_path / "x"), merge="ties", **common), train, progress=False)


def _resume_equals_uninterrupted(tmp_path, name, run):
    """Run 6 steps (checkpoints at 3 and 6); then restart a copy from step 3: same weights and metrics."""
    full = tmp_path / f"{name}-full"
    run(full)
    part = tmp_path / f"{name}-part"
    part.mkdir()
    shutil.copytree(full / "step-00000003", part / "step-00000003")
    (part / "latest").write_text("step-00000003\n")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")  # one line past the checkpoint: dropped
    run(part)
    drop = ("seconds", "tokens_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in metrics(part)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in metrics(full)]
    from safetensors.torch import load_file

    a = load_file(full / "step-00000006" / "model.safetensors")
    b = load_file(part / "step-00000006" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_resume_is_exact(tmp_path):
    train = separable_pairs(32, 1)
    _resume_equals_uninterrupted(tmp_path, "dpo", lambda out: train_dpo(
        DPOConfig(out_dir=str(out), model="tiny", lr=1e-3, steps=6, batch_size=8, save_every=3), train,
        progress=False))


@pytest.mark.parametrize("method", ["dare", "ties"])
def test_dpo_with_online_merging_resumes_exactly(tmp_path, method):
    """Merging every 2 steps with a checkpoint at step 3: the merge anchor travels in the optimizer state."""
    _save_base_and_sft(tmp_path)
    train = separable_pairs(32, 1)
    _resume_equals_uninterrupted(tmp_path, f"dpo-{method}", lambda out: train_dpo(
        DPOConfig(out_dir=str(out), model=str(tmp_path / "sft"), lr=1e-3, steps=6, batch_size=8, save_every=3,
                  merge=method, base_model=str(tmp_path / "base"), merge_weight=0.05, merge_keep=0.5,
                  merge_every=2), train, progress=False))
    assert metrics(tmp_path / f"dpo-{method}-full")[-1]["rewards/margins"] > 0


def test_grpo_with_a_reward_model_as_reward(tmp_path):
    """A reward model trained to prefer ids 10-19 steers GRPO's samples toward them."""
    rm, _ = train_reward_model(RMConfig(out_dir=str(tmp_path / "rm"), model="tiny", lr=3e-3, steps=20, batch_size=8),
                               separable_pairs(64, 1), progress=False)
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_ids": torch.randint(40, 100, (4,), generator=g).tolist()} for _ in range(8)]
    cfg = GRPOConfig(out_dir=str(tmp_path / "grpo"), model="tiny", lr=1e-2, steps=6, queries_per_step=4,
                     group_size=8, sampling=SamplingParams(temperature=1.0, max_new_tokens=4),
                     vocab_limit=32)
    train_grpo(cfg, prompts, reward_fn(rm), progress=False)
    rows = metrics(tmp_path / "grpo")
    assert rows[-1]["reward"] > rows[0]["reward"] + 0.5, [round(r["reward"], 3) for r in rows]  # 0.25 -> 1.8


def _digit7(prompts, completions, examples):
    """Toy verifiable reward: the share of completion tokens that are the id 7 ("answer with the digit 7")."""
    return [sum(t == 7 for t in c) / max(1, len(c)) for c in completions]


def _grpo_cfg(out, **kw):
    return GRPOConfig(out_dir=str(out), model="tiny", lr=1e-2, queries_per_step=4, group_size=8,
                      sampling=SamplingParams(temperature=1.0, max_new_tokens=4), vocab_limit=16, **kw)


@pytest.mark.parametrize("loss_type", ["token", "sequence", "dr_grpo"])
def test_grpo_raises_the_mean_reward(tmp_path, loss_type):
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_ids": torch.randint(40, 100, (4,), generator=g).tolist()} for _ in range(16)]
    train_grpo(_grpo_cfg(tmp_path / "grpo", steps=8, beta=0.04, loss_type=loss_type), prompts, _digit7,
               progress=False)
    rows = metrics(tmp_path / "grpo")
    assert rows[0]["reward"] < 0.15  # ~1/16 by chance
    assert sum(r["reward"] for r in rows[-2:]) / 2 >= 0.3, [round(r["reward"], 3) for r in rows]
    assert {"kl", "frac_zero_std", "reward_std", "completion_length"} <= set(rows[-1])
    assert 0 <= rows[0]["frac_zero_std"] <= 1


@pytest.mark.parametrize("updates", [1, 2])
def test_grpo_resume_is_exact(tmp_path, updates):
    """With 2 updates per rollout the step-3 checkpoint falls inside a rollout: it is restored, not resampled."""
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_ids": torch.randint(40, 100, (4,), generator=g).tolist()} for _ in range(16)]
    _resume_equals_uninterrupted(tmp_path, "grpo", lambda out: train_grpo(
        _grpo_cfg(out, steps=6, save_every=3, updates_per_rollout=updates), prompts, _digit7, progress=False))
    rows = metrics(tmp_path / "grpo-full")
    if updates == 2:  # the second update reuses the rollout: same rewards, and a ratio away from 1 gets clipped
        assert all(rows[i]["reward"] == rows[i + 1]["reward"] for i in (0, 2, 4))
        assert rows[0]["clip_ratio"] == 0 and max(r["clip_ratio"] for r in rows[1::2]) > 0


def test_prioritise_prefers_unseen_then_high_variance_queries():
    assert sorted(prioritise({}, 5, 5, step=0)) == [0, 1, 2, 3, 4]
    seen = {0: 0.0, 1: 0.25, 2: 0.01, 3: 0.0}
    assert prioritise(seen, 5, 3, step=1) == [4, 1, 2]
    assert prioritise(seen, 5, 2, step=7) == prioritise(seen, 5, 2, step=7)  # pure
    mixed = prioritise(seen, 5, 4, step=1, explore=0.5)
    assert mixed[:2] == [4, 1] and set(mixed[2:]) <= {0, 2, 3} and len(set(mixed)) == 4
    # Over many steps, exploration revisits the zero-variance queries the ranking alone would starve.
    assert {q for s in range(20) for q in prioritise(seen, 5, 2, step=s, explore=0.5)} == {0, 1, 2, 3, 4}


def test_weighted_rewards_sum_several_reward_functions():
    from qwen25.post.grpo import weighted_rewards

    f = weighted_rewards([_digit7, lambda p, c, e: [len(x) for x in c]], [2.0, 0.5])
    assert f(None, [[7, 7, 1, 2], [3]], None) == [2.0 * 0.5 + 0.5 * 4, 0.5 * 1]


def test_stages_run_under_bf16_autocast(tmp_path):
    """dtype: bf16 autocasts the forward passes; losses stay finite and log-probs are computed in fp32."""
    dpo = train_dpo(DPOConfig(out_dir=str(tmp_path / "dpo"), model="tiny", lr=1e-3, steps=2, batch_size=4,
                              dtype="bf16"), separable_pairs(8, 1), progress=False)
    grpo = train_grpo(_grpo_cfg(tmp_path / "grpo", steps=2, dtype="bf16", beta=0.1, updates_per_rollout=2),
                      [{"prompt_ids": [50, 51, 52]}] * 4, _digit7, progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in (dpo["loss"], grpo["loss"], grpo["kl"]))


def test_rollout_prefills_a_groups_prompt_once(monkeypatch):
    """A group's later samples copy its prompt from the rollout engine's prefix cache instead of prefilling it, and
    every sample is still the one it gets alone with its seed."""
    from dataclasses import replace

    from qwen25.generation import Engine
    from qwen25.post import grpo

    engines = []

    class Recorded(Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engines.append(self)

    monkeypatch.setattr(grpo, "Engine", Recorded)
    model = load_causal_lm("tiny", seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(40, 100, (n,), generator=g).tolist() for n in (40, 9)]  # 2 whole blocks; none
    cfg = GRPOConfig(group_size=4, seed=3, sampling=SamplingParams(temperature=1.0, max_new_tokens=6))
    out = grpo.rollout(model, prompts, cfg, step=2)
    assert engines[0].stats["reused_tokens"] == 3 * 32  # the 40-token prompt's 3 later samples, 2 blocks of 16 each
    flat = [p for p in prompts for _ in range(4)]
    seeds = [replace(cfg.sampling, seed=3 * 1_000_003 + 2 * 4099 + i) for i in range(8)]
    alone = Engine(model.eval(), max_batch=1, prefix_capacity_blocks=0).generate(flat, seeds)  # one slot: one at a time
    assert out == alone and len({tuple(c) for c in out}) == 8


def test_dpo_rpo_alpha_adds_the_chosen_responses_token_nll(tmp_path):
    """rpo_alpha (TRL's RPO term): the first step's loss is DPO's log 2 plus alpha x the chosen tokens' mean cross
    entropy under the starting model, computed here directly."""
    import torch.nn.functional as F

    pairs = separable_pairs(8, 3)
    cfg = DPOConfig(out_dir=str(tmp_path / "rpo"), model="tiny", lr=1e-3, steps=1, batch_size=8, rpo_alpha=2.0)
    train_dpo(cfg, pairs, progress=False)
    row = metrics(tmp_path / "rpo")[0]
    model = load_causal_lm("tiny", seed=0).eval()
    ce, n = 0.0, 0
    with torch.no_grad():
        for p in pairs:
            ids = torch.tensor([p["prompt_ids"] + p["chosen_ids"]])
            logits = model(ids[:, :-1])[0, len(p["prompt_ids"]) - 1:]
            ce += F.cross_entropy(logits, ids[0, len(p["prompt_ids"]):], reduction="sum").item()
            n += len(p["chosen_ids"])
    assert row["nll_loss"] == pytest.approx(ce / n, rel=1e-4)
    assert row["loss"] == pytest.approx(0.6931472 + 2.0 * ce / n, rel=1e-4)


def test_grpo_starts_from_given_query_variances(tmp_path):
    """Hand-made variances (e.g. of rejection sampling's groups on the same queries): the first steps sample the
    queries whose responses disagreed most, in that order."""
    asked = []

    def reward(prompts, completions, examples):
        asked.append(examples[0]["q"])
        return [1.0] * len(completions)  # every group agrees: a query sampled once drops to variance 0

    prompts = [{"prompt_ids": [40 + q, 41, 42], "q": q} for q in range(6)]
    variances = {0: 0.0, 1: 0.05, 2: 0.25, 3: 0.0, 4: 0.2, 5: 0.1}
    cfg = GRPOConfig(out_dir=str(tmp_path / "g"), model="tiny", lr=1e-2, steps=3, queries_per_step=1, group_size=4,
                     explore=0.0, sampling=SamplingParams(temperature=1.0, max_new_tokens=2), vocab_limit=16)
    train_grpo(cfg, prompts, reward, progress=False, variances=variances)
    assert asked == [2, 4, 5]  # 0.25, 0.2, 0.1: each query's own group then sets its variance to 0
