"""Unit tests of the model and losses: every weight and switch matters, graphs, attention, D, GP."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mmssl.config import Config
from mmssl.graph import topk_count
from mmssl.losses import gradient_penalty
from mmssl.model import Discriminator, InterModalAttention
from mmssl.step import LOSS_TERMS, train_step
from mmssl.train import Run

SEARCHED = {  # key -> a changed value
    "gp_weight": 3.0, "cl_weight": 0.5, "adv_weight": 0.5, "l2_weight": 0.1, "gumbel_tau": 0.5,
    "cl_tau": 0.1, "aug_weight": 1.0, "fusion_weight": 0.1, "modal_id_weight": 2.0, "topk_rate": 0.3,
}
SWITCHES = ("adversarial", "contrastive", "gumbel", "augment", "attention")


def one_step(cfg: Config, data, steps: int = 1):
    """Build a run from cfg's seed and take ``steps`` batches; returns (loss terms, run)."""
    run = Run(cfg, data, torch.device("cpu"))
    terms = None
    for s in range(steps):
        users, pos, neg = (torch.from_numpy(a) for a in run.sampler.sample())
        terms = train_step(run.model, run.disc, run.opt, run.opt_d, run.train_t, users, pos, neg, cfg,
                           rebuild=s % cfg.refresh_every == 0)
    return terms, run


def grads_after_one_step(cfg, data):
    _, run = one_step(cfg, data)
    return torch.cat([p.detach().flatten() for p in run.model.parameters()])


def test_same_seed_same_step(tiny, small_cfg):
    a, _ = one_step(small_cfg, tiny)
    b, _ = one_step(small_cfg, tiny)
    assert torch.equal(a, b)


@pytest.mark.parametrize("key", sorted(SEARCHED))
def test_every_searched_weight_changes_loss_or_gradients(tiny, small_cfg, key):
    base_terms, _ = one_step(small_cfg, tiny, steps=2)
    changed = small_cfg.replace(**{key: SEARCHED[key]})
    terms, _ = one_step(changed, tiny, steps=2)
    if torch.allclose(base_terms, terms, rtol=0, atol=0):  # the loss did not move: the update must have
        assert not torch.equal(grads_after_one_step(small_cfg, tiny), grads_after_one_step(changed, tiny)), key
    else:
        assert not torch.equal(base_terms, terms)


@pytest.mark.parametrize("switch", SWITCHES)
def test_every_switch_changes_the_output(tiny, small_cfg, switch):
    base_terms, base = one_step(small_cfg, tiny, steps=2)
    terms, run = one_step(small_cfg.replace(**{switch: False}), tiny, steps=2)
    with torch.no_grad():
        base.model.eval(), run.model.eval()
        h0, h1 = base.model().h_user, run.model().h_user
    assert not torch.equal(base_terms, terms) and not torch.equal(h0, h1)


def test_modality_subset_and_id_only(tiny, small_cfg):
    _, sub = one_step(small_cfg.replace(modalities=["image"]), tiny)
    assert sub.model.modalities == ["image"] and sub.disc is not None
    terms, idonly = one_step(small_cfg.replace(modalities=[]), tiny)
    assert idonly.model.modalities == [] and idonly.disc is None
    named = dict(zip(LOSS_TERMS, terms.tolist()))
    assert named["train/loss_cl"] == 0 and named["train/loss_g"] == 0 and named["train/loss_d"] == 0
    assert named["train/loss_bpr"] > 0


def test_generated_graphs_have_k_neighbours_every_batch(tiny, small_cfg):
    cfg = small_cfg.replace(topk_rate=0.1)
    k = topk_count(cfg.topk_rate, tiny.n_items)
    run = Run(cfg, tiny, torch.device("cpu"))
    for s in range(3):  # the released code left the graphs empty from the 2nd batch on
        users, pos, neg = (torch.from_numpy(a) for a in run.sampler.sample())
        train_step(run.model, run.disc, run.opt, run.opt_d, run.train_t, users, pos, neg, cfg, rebuild=True)
        for m, g in run.model.graphs.items():
            assert g.cols.shape == (tiny.n_users, k), m
            assert all(len(set(row)) == k for row in g.cols.tolist()), m
            assert torch.equal(g.mat.crow_indices().diff(), torch.full((tiny.n_users,), k)), m
            assert g.item_side.mat._nnz() == tiny.n_users * k


def test_topk_count_never_zero():
    assert topk_count(0.001, 100) == 1 and topk_count(0.01, 7050) == 70 and topk_count(1.0, 5) == 5


def test_attention_wq_and_wk_get_gradients():
    torch.manual_seed(0)
    att = InterModalAttention(16, 4)
    views = [torch.randn(10, 16) for _ in range(3)]
    (att(views) ** 2).sum().backward()
    assert att.w_q.grad.abs().sum() > 0 and att.w_k.grad.abs().sum() > 0


def test_attention_gradients_in_the_full_model(tiny, small_cfg):
    run = Run(small_cfg, tiny, torch.device("cpu"))
    out = run.model(rebuild=True)
    (out.h_user.pow(2).sum() + out.h_item.pow(2).sum()).backward()
    assert run.model.attention.w_q.grad.abs().sum() > 0 and run.model.attention.w_k.grad.abs().sum() > 0


def test_discriminator_is_not_affine():
    d = Discriminator(64, 0.0, 0.0)
    slopes = [m.negative_slope for m in d.modules() if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.2, 0.2]
    d.eval()
    torch.manual_seed(0)
    x, y = torch.randn(4, 64), torch.randn(4, 64)
    pre = lambda z: d.out(d.gamma2(d.rest1(d.first_layer(z)))).squeeze(-1)  # noqa: E731
    assert not torch.allclose(pre(x + y) - pre(y), pre(x) - pre(torch.zeros(4, 64)), atol=1e-4)
    assert d.lin1.weight.shape == (16, 64) and d.gamma2[0].weight.shape == (8, 16)


def test_gradient_penalty_matches_autograd_reference():
    torch.manual_seed(3)
    w = torch.randn(6, 5)

    def critic(x):  # a toy non-linear critic; rows independent
        return torch.tanh(x @ w).sum(1)

    real, fake = torch.randn(8, 6), torch.randn(8, 6)
    torch.manual_seed(11)
    gp = gradient_penalty(critic, real, fake)
    torch.manual_seed(11)
    alpha = torch.rand(8, 1)
    expected = []
    for r in range(8):  # per-row reference with an explicit Jacobian
        x = alpha[r] * real[r] + (1 - alpha[r]) * fake[r]
        g = torch.autograd.functional.jacobian(lambda z: critic(z.unsqueeze(0))[0], x)
        expected.append((g.norm() - 1) ** 2)
    assert gp.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


def test_gradient_penalty_is_differentiable_in_critic_parameters():
    lin = nn.Linear(4, 1)
    gp = gradient_penalty(lambda x: lin(x).squeeze(-1), torch.randn(5, 4), torch.randn(5, 4))
    gp.backward()
    # for a linear critic GP = (||w|| - 1)^2 exactly
    assert gp.item() == pytest.approx((lin.weight.norm().item() - 1) ** 2, rel=1e-5)
    assert lin.weight.grad.abs().sum() > 0
