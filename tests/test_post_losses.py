"""Post-training losses against TRL on the same tensors: DPO (sigmoid) and its reward metrics, the reward model's
Bradley-Terry loss, GRPO's per-token loss and aggregations, group advantages, SFT assistant-only masking; and
sequence log-probabilities against a direct gather.

TRL's losses live inside trainer methods; the tests call those methods themselves (DPOTrainer._compute_loss,
GRPOTrainer._compute_loss, RewardTrainer.compute_loss) on a stand-in `self` that holds only the attributes the
methods read, and a stand-in model that returns the tensors we also give our functions.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from post_fixtures import one_thread  # noqa: F401

from qwen25.config import ModelConfig
from qwen25.model import CausalLM
from qwen25.post.dpo import dpo_loss
from qwen25.post.grpo import aggregate, group_advantages, grpo_token_loss
from qwen25.post.logprobs import pad_batch, prompt_completion_batch, sequence_logprobs, token_logprobs
from qwen25.post.reward import bradley_terry_loss
from qwen25.post.sft import sft_loss, sft_target_mask

trl = pytest.importorskip("trl")


class _Accelerator:
    """What TRL's loss methods ask of accelerate on one process."""

    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trainer_self(**attrs):
    base = dict(accelerator=_Accelerator(), model=SimpleNamespace(training=True), aux_loss_enabled=False,
                _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    return SimpleNamespace(**{**base, **attrs})


def _random_pairs(b=6, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * b, t + 1)
    for row in range(2 * b):
        start = int(torch.randint(1, 4, (), generator=g))
        end = int(torch.randint(start + 2, t + 2, (), generator=g))
        mask[row, start:end] = 1
    per_token = -torch.rand(2 * b, t, generator=g) * 3 * mask[:, 1:]
    ref = torch.randn(2, b, generator=g) * 3 - 10
    return mask, per_token, ref


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_and_metrics_equal_trl(beta):
    from trl.trainer.dpo_trainer import DPOTrainer

    mask, per_token, ref = _random_pairs(seed=int(beta * 10))
    b = per_token.shape[0] // 2
    policy = per_token.clone().requires_grad_(True)
    outputs = SimpleNamespace(log_probs=policy, entropy=torch.zeros_like(policy), mean_logits=torch.zeros_like(policy),
                              is_top1=torch.zeros_like(policy, dtype=torch.bool))
    fake = _trainer_self(precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
                         loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, use_weighting=False)
    inputs = {"input_ids": torch.ones_like(mask, dtype=torch.long), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": ref[0], "ref_rejected_logps": ref[1]}
    theirs = DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, return_outputs=False)
    (their_grad,) = torch.autograd.grad(theirs, policy)

    ours_policy = per_token.clone().requires_grad_(True)
    logps = ours_policy.sum(-1)
    loss, metrics = dpo_loss(logps[:b], logps[b:], ref[0], ref[1], beta)
    (our_grad,) = torch.autograd.grad(loss, ours_policy)
    torch.testing.assert_close(loss, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(our_grad, their_grad)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert metrics[key] == pytest.approx(fake._metrics["train"][key][0], rel=1e-6, abs=1e-7), key
    assert 0 < metrics["rewards/accuracies"] < 1  # the random pairs rank both ways: the metric is exercised


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_loss_equals_trl_reward_trainer(with_margin):
    from trl.trainer.reward_trainer import RewardTrainer

    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(10, 1, generator=g, requires_grad=True)
    margin = torch.rand(5, generator=g)
    fake = _trainer_self(args=SimpleNamespace(center_rewards_coefficient=None))
    inputs = {"input_ids": torch.ones(10, 4, dtype=torch.long), "attention_mask": torch.ones(10, 4)}
    if with_margin:
        inputs["margin"] = margin
    theirs = RewardTrainer.compute_loss(fake, lambda **kw: SimpleNamespace(logits=rewards), inputs)
    chosen, rejected = rewards.squeeze(-1).chunk(2)
    loss, metrics = bradley_terry_loss(chosen, rejected, margin if with_margin else None)
    torch.testing.assert_close(loss, theirs)
    assert metrics["accuracy"] == pytest.approx(fake._metrics["train"]["accuracy"][0])
    assert metrics["margin"] == pytest.approx(fake._metrics["train"]["margin"][0], abs=1e-7)
    assert metrics["mean_reward"] == pytest.approx(fake._metrics["train"]["mean_reward"][0], abs=1e-7)


def _trl_grpo(loss_type, beta, logps, old, ref, adv, mask, max_len, eps_low=0.2, eps_high=0.28):
    from trl.trainer.grpo_trainer import GRPOTrainer

    b, t = mask.shape
    fake = _trainer_self(
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", use_vllm=False,
        current_gradient_accumulation_steps=1, max_completion_length=max_len, _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    inputs = {"prompt_ids": torch.ones(b, 3, dtype=torch.long), "prompt_mask": torch.ones(b, 3),
              "completion_ids": torch.ones(b, t, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(fake, None, inputs), fake._metrics["train"]


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("ours_type,trl_type", [("sequence", "grpo"), ("token", "dapo"), ("token", "bnpo"),
                                                ("dr_grpo", "dr_grpo")])
def test_grpo_loss_equals_trl(ours_type, trl_type, beta):
    g = torch.Generator().manual_seed(11)
    b, t, max_len = 8, 7, 10
    mask = (torch.arange(t)[None] < torch.randint(2, t + 1, (b, 1), generator=g)).float()
    logps = (-torch.rand(b, t, generator=g) * 2).requires_grad_(True)
    old = logps.detach() + torch.randn(b, t, generator=g) * 0.3  # ratios far enough from 1 to clip
    ref = logps.detach() + torch.randn(b, t, generator=g) * 0.2
    adv = torch.randn(b, generator=g)
    theirs, their_metrics = _trl_grpo(trl_type, beta, logps, old, ref, adv, mask, max_len)
    (their_grad,) = torch.autograd.grad(theirs, logps)

    token_loss, kl = grpo_token_loss(logps, old, adv, ref, beta, 0.2, 0.28)
    ours = aggregate(token_loss, mask, ours_type, max_len)
    (our_grad,) = torch.autograd.grad(ours, logps)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)
    ratio = torch.exp(logps - old)
    assert ((ratio > 1.28) & (mask > 0)).any() and ((ratio < 0.8) & (mask > 0)).any()  # both clips exercised
    if beta:
        assert float((kl.detach() * mask).sum() / mask.sum()) == pytest.approx(their_metrics["kl"][0], rel=1e-5)


def test_group_advantages_equal_trl_formula():
    """TRL normalises group by group with its nanstd (Bessel-corrected) and eps 1e-4; zero-variance groups -> 0."""
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(5)
    rewards = torch.randint(0, 3, (6, 8), generator=g).float()
    rewards[2] = 1.0  # a zero-variance group
    rewards = rewards.reshape(-1)
    adv, std = group_advantages(rewards, 8)
    mean = rewards.view(-1, 8).mean(1).repeat_interleave(8)
    their_std = nanstd(rewards.view(-1, 8), dim=1).repeat_interleave(8)
    torch.testing.assert_close(adv, (rewards - mean) / (their_std + 1e-4))
    torch.testing.assert_close(std, their_std)
    assert torch.all(adv[16:24] == 0)
    torch.testing.assert_close(adv.view(-1, 8).sum(1), torch.zeros(6), atol=1e-5, rtol=0)


def test_sequence_logprobs_equal_a_direct_gather():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_preset("tiny"))
    model.init_weights(seed=1)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    completions = [[20, 21, 22, 23], [24], [25, 26]]
    batch = prompt_completion_batch(prompts, completions)
    with torch.no_grad():
        got = sequence_logprobs(model, batch)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        with torch.no_grad():
            logp = model(torch.tensor([p + c])).log_softmax(-1)[0]
        expected = sum(float(logp[len(p) - 1 + j, tok]) for j, tok in enumerate(c))
        assert float(got[i]) == pytest.approx(expected, abs=1e-4)
    logits = torch.randn(2, 5, 30)
    targets = torch.randint(0, 30, (2, 5))
    torch.testing.assert_close(token_logprobs(logits, targets, 0.7),
                               (logits / 0.7).log_softmax(-1).gather(-1, targets[..., None])[..., 0])


def test_sft_loss_equals_trl_assistant_only_loss_on_a_real_conversation():
    """Our ids and mask (encode_chat) vs transformers + TRL's qwen2_5_training template (multi-turn, tool calls
    and results); our loss vs TRL's labels (collator) through transformers' causal-LM loss, on the same logits."""
    from tokenizer_fixtures import auto_qwen_tokenizer, qwen_tokenizer, read_template
    from transformers.loss.loss_utils import ForCausalLMLoss
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from qwen25.tokenizer import encode_chat

    template = read_template("qwen2_5_training.jinja")
    hf, ours = auto_qwen_tokenizer(), qwen_tokenizer()
    conversations = [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
         {"role": "assistant", "content": "6, because 3+3=6."}],
        [{"role": "user", "content": "Say hi in French."}, {"role": "assistant", "content": "Bonjour !"}],
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "", "tool_calls": [
             {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
         {"role": "tool", "content": '{"temp": 21}'}, {"role": "assistant", "content": "21°C in Paris."}],
    ]
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                                "parameters": {"type": "object",
                                                               "properties": {"city": {"type": "string"}}}}}
    examples, encoded = [], []
    for messages in conversations:
        tools = [weather] if any("tool_calls" in m for m in messages) else None
        theirs = hf.apply_chat_template(copy.deepcopy(messages), tools=tools, chat_template=template, tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
        enc = encode_chat(ours, messages, tools)
        assert enc.ids == list(theirs["input_ids"]) and enc.assistant_mask == list(theirs["assistant_masks"])
        labels = [t if m else -100 for t, m in zip(theirs["input_ids"], theirs["assistant_masks"])]  # TRL build_labels
        examples.append({"input_ids": list(theirs["input_ids"]), "labels": labels})
        encoded.append((enc.ids, enc.assistant_mask))
    collated = DataCollatorForLanguageModeling(pad_token_id=hf.pad_token_id).torch_call(examples)
    vocab = int(collated["input_ids"].max()) + 1
    logits = torch.randn(*collated["input_ids"].shape, vocab, generator=torch.Generator().manual_seed(0))
    theirs = ForCausalLMLoss(logits, collated["labels"], vocab_size=vocab)
    batch = pad_batch([ids for ids, _ in encoded], [m for _, m in encoded], hf.pad_token_id)
    ours_loss = sft_loss(logits[:, :-1], batch.input_ids, sft_target_mask(batch.completion_mask))
    torch.testing.assert_close(ours_loss, theirs)


def test_sft_loss_ignores_non_assistant_targets():
    """Same logits: changing a user-turn token leaves the loss unchanged, changing an assistant token does not;
    the gradient at positions predicting non-assistant tokens is exactly zero."""
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 50, (1, 12), generator=g)
    mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1]])  # two assistant turns
    logits = torch.randn(1, 11, 50, generator=g, requires_grad=True)
    base = sft_loss(logits, tokens, sft_target_mask(mask))
    user_changed = tokens.clone()
    user_changed[0, 2] = (user_changed[0, 2] + 1) % 50
    assert sft_loss(logits, user_changed, sft_target_mask(mask)).item() == base.item()
    assistant_changed = tokens.clone()
    assistant_changed[0, 5] = (assistant_changed[0, 5] + 1) % 50
    assert sft_loss(logits, assistant_changed, sft_target_mask(mask)).item() != base.item()
    (grad,) = torch.autograd.grad(base, logits)
    predicts_assistant = mask[0, 1:].bool()
    assert torch.all(grad[0, ~predicts_assistant] == 0) and torch.all(grad[0, predicts_assistant].abs().sum(-1) > 0)
