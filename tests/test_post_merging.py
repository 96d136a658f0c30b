"""The Online Merging Optimizer: OnDARE reduces to AdamW exactly (a = 0, p = 1) and steps onto the SFT delta
(a = 1, p = 1); DARE masks keep ~p of entries rescaled by 1/p; OnTIES sign consensus on a hand example; every
parameter is merged, also with merge_every > 1 (the published step-K code updates only the first)."""

from __future__ import annotations

import pytest
import torch
from post_fixtures import one_thread  # noqa: F401

from qwen25.post.merging import OnlineMergingOptimizer, dare, sft_delta, ties_merge, top_magnitude


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in [(6, 5), (5,), (3, 4, 2)]]


def _adamw(params, wd=0.1):
    return torch.optim.AdamW([{"params": params[:1], "weight_decay": wd}, {"params": params[1:], "weight_decay": 0}],
                             lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def _set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def test_ondare_with_weight_0_and_keep_1_is_adamw_bitwise():
    plain, merged = _params(), _params()
    taus = {p: torch.randn_like(p) for p in merged}
    reference = _adamw(plain)
    optimizer = OnlineMergingOptimizer(_adamw(merged), taus, "dare", merge_weight=0.0, keep=1.0)
    for step in range(5):
        _set_grads(plain, step)
        _set_grads(merged, step)
        reference.step()
        optimizer.step()
        for a, b in zip(plain, merged):
            assert torch.equal(a, b), f"step {step}: OnDARE(a=0, p=1) differs from AdamW"


def test_ondare_with_weight_1_and_keep_1_steps_onto_the_sft_delta():
    params = _params()
    taus = {p: torch.randn_like(p) for p in params}
    before = [p.detach().clone() for p in params]
    optimizer = OnlineMergingOptimizer(_adamw(params), taus, "dare", merge_weight=1.0, keep=1.0)
    _set_grads(params, 0)
    optimizer.step()
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b + taus[p])
    # Half and half: theta = before + 0.5 * adamw update + 0.5 * tau.
    params, plain = _params(), _params()
    taus = {p: torch.randn_like(p) for p in params}
    before = [p.detach().clone() for p in params]
    optimizer = OnlineMergingOptimizer(_adamw(params), taus, "dare", merge_weight=0.5, keep=1.0)
    reference = _adamw(plain)
    _set_grads(params, 0)
    _set_grads(plain, 0)
    optimizer.step()
    reference.step()
    for p, q, b in zip(params, plain, before):
        torch.testing.assert_close(p.detach(), b + 0.5 * (q.detach() - b) + 0.5 * taus[p])


@pytest.mark.parametrize("keep", [0.01, 0.3, 0.9])
def test_dare_keeps_about_p_and_rescales_by_1_over_p(keep):
    x = torch.rand(200_000) + 0.5
    out = dare(x, keep, torch.Generator().manual_seed(0))
    kept = out != 0
    assert kept.float().mean().item() == pytest.approx(keep, abs=4 * (keep * (1 - keep) / x.numel()) ** 0.5 + 1e-4)
    torch.testing.assert_close(out[kept], x[kept] / keep)
    assert out.mean().item() == pytest.approx(x.mean().item(), rel=0.05)  # unbiased


def test_ties_sign_consensus_hand_example():
    tau = torch.tensor([1.0, -2.0, 3.0, -0.5, 0.0])
    update = torch.tensor([-0.5, 1.0, 1.0, -1.0, 2.0])
    # majority sign of tau + update: [+, -, +, -, +]; update entries 0 and 1 disagree and are dropped,
    # tau's entries all agree (its 0 has no sign and contributes nothing).
    out = ties_merge(update, tau, weight=0.5)
    torch.testing.assert_close(out, torch.tensor([0.5, -1.0, 2.0, -0.75, 1.0]))
    torch.testing.assert_close(top_magnitude(torch.tensor([0.1, -3.0, 2.0, -0.2]), 0.5),
                               torch.tensor([0.0, -3.0, 2.0, 0.0]))


def test_onties_step_equals_the_hand_formula():
    params, plain = _params(), _params()
    taus = {p: torch.randn_like(p) for p in params}
    before = [p.detach().clone() for p in params]
    optimizer = OnlineMergingOptimizer(_adamw(params), taus, "ties", merge_weight=0.3, keep=0.5)
    reference = _adamw(plain)
    _set_grads(params, 0)
    _set_grads(plain, 0)
    optimizer.step()
    reference.step()
    for p, q, b in zip(params, plain, before):
        d = top_magnitude(q.detach() - b, 0.5)
        t = top_magnitude(taus[p], 0.5)
        torch.testing.assert_close(p.detach(), b + ties_merge(d, t, 0.3))


@pytest.mark.parametrize("method", ["dare", "ties"])
def test_every_parameter_is_merged_also_every_k_steps(method):
    """merge_every=3: steps 1-2 are plain AdamW for every parameter, step 3 merges the accumulated update of
    every parameter (the published K-step code returns after the first parameter)."""
    params, plain = _params(), _params()
    taus = {p: torch.full_like(p, 0.5) for p in params}
    optimizer = OnlineMergingOptimizer(_adamw(params), taus, method, merge_weight=0.5, keep=1.0, merge_every=3)
    reference = _adamw(plain)
    start = [p.detach().clone() for p in params]
    for step in range(3):
        _set_grads(params, step)
        _set_grads(plain, step)
        optimizer.step()
        reference.step()
        if step < 2:
            for p, q, s in zip(params, plain, start):
                assert torch.equal(p, q) and not torch.equal(p, s), f"step {step + 1} is not plain AdamW"
    for i, (p, q, s) in enumerate(zip(params, plain, start)):
        assert not torch.allclose(p, q), f"parameter {i} was not merged at step 3"
        if method == "dare":
            torch.testing.assert_close(p.detach(), s + 0.5 * (q.detach() - s) + 0.5 * taus[p])
        assert torch.equal(optimizer.state[p]["merge_anchor"], p.detach())


def test_sft_delta_is_the_difference_by_name():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    delta = sft_delta(a, b)
    torch.testing.assert_close(delta["weight"], a.weight.detach() - b.weight.detach())
    with pytest.raises(ValueError, match="differ at"):
        sft_delta(a, torch.nn.Linear(4, 2))
