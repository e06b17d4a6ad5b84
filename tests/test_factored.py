"""The factored discriminator (``disc_impl: factored``) is an exact re-computation of the dense one.

float64 on random small problems and on a TikTok slice: rows, first layer, L_D, GP, L_G and
the gradients of D's and of the model's parameters equal the dense path's to 1e-9
(relative to the largest entry). float32 with dropout: train_step's loss terms to 1e-5;
two epochs of training: the same metrics to 1e-4.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import mmssl.factored as fac
from mmssl.config import Config
from mmssl.errors import ConfigError
from mmssl.factored import (factored_discriminator_loss, factored_fake_rows, factored_generator_loss,
                            factored_gradient_penalty, factored_real_rows)
from mmssl.graph import batch_pairs, batch_rows, observed_operators, to_torch_csr
from mmssl.losses import discriminator_loss, fake_rows, generator_loss, gradient_penalty, gumbel_real_rows
from mmssl.model import Discriminator
from mmssl.step import train_step
from mmssl.synthetic import make_dataset
from mmssl.train import Run, fit

ROOT = Path(__file__).resolve().parents[1]
TIKTOK = ROOT.parent / "shared" / "data" / "tiktok"
if not TIKTOK.is_dir():
    TIKTOK = Path("/work/shared/data/tiktok")
TOL = 1e-9
CASES = {"tau=0.002": dict(tau=0.002), "tau=1.0 (dense softmax)": dict(tau=1.0),
         "gumbel=false": dict(gumbel=False), "augment=false": dict(augment=False)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


class Problem:
    """A tiny float64 'model': f̄ = X W_m per modality, views on the observed graph (eq. 2), random h."""

    def __init__(self, train: sp.csr_matrix, feats: dict[str, np.ndarray], batch: int, d: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.n_users, self.n_items = train.shape
        a_u, a_i = observed_operators(train, "cpu")
        self.a_u, self.a_i = a_u.mat.to_dense().double(), a_i.mat.to_dense().double()
        self.x = {m: torch.from_numpy(v).double() for m, v in feats.items()}
        self.w = {m: (torch.randn(v.shape[1], d, generator=g, dtype=torch.float64) / v.shape[1] ** 0.5)
                  .requires_grad_(True) for m, v in feats.items()}
        self.h_user = torch.randn(self.n_users, d, generator=g, dtype=torch.float64)
        self.h_item = torch.randn(self.n_items, d, generator=g, dtype=torch.float64)
        self.users = torch.randperm(self.n_users, generator=g)[:batch]
        train_t = to_torch_csr(train, "cpu")
        self.pairs = batch_pairs(train_t, self.users)
        self.observed = batch_rows(train_t, self.users).double()

    def views(self):
        out = {}
        for m, x in self.x.items():
            f_u = self.a_u @ (x @ self.w[m])
            out[m] = (f_u[self.users], self.a_i @ f_u)
        return out

    def params(self):
        return list(self.w.values())


def random_problem(seed=0, n_users=60, n_items=160, batch=24, d=8, density=0.05) -> Problem:
    rng = np.random.default_rng(seed)
    train = sp.random(n_users, n_items, density=density, format="csr", random_state=rng)
    train.data[:] = 1.0
    train = train.astype(np.float32)
    feats = {"a": rng.standard_normal((n_items, 12)), "b": rng.standard_normal((n_items, 5))}
    return Problem(train, feats, batch, d, seed)


def both_rows(p: Problem, tau=0.002, gumbel=True, augment=True, zeta=100.0, seed=7):
    views = p.views()
    dense_fake = torch.cat([fake_rows(fu, fi, p.observed) for fu, fi in views.values()])
    fact_fake = [factored_fake_rows(fu, fi, p.pairs) for fu, fi in views.values()]
    hu = p.h_user[p.users]
    torch.manual_seed(seed)
    dense_real = gumbel_real_rows(p.observed, hu, p.h_item, tau, zeta, gumbel=gumbel, augment=augment)
    torch.manual_seed(seed)
    fact_real = factored_real_rows(p.pairs, len(p.users), hu, p.h_item, tau, zeta, gumbel=gumbel, augment=augment)
    return dense_fake, fact_fake, dense_real, fact_real


def critic(n_items: int, seed: int = 3) -> Discriminator:
    torch.manual_seed(seed)
    return Discriminator(n_items, 0.0, 0.0).double().train()


def compare_losses(p: Problem, case: dict, gp_weight=0.3) -> dict[str, float]:
    """Every equality of the issue on problem ``p``; returns the max relative errors by name."""
    dense_fake, fact_fake, dense_real, fact_real = both_rows(p, **case)
    d = critic(p.n_items)
    errs = {"fake rows": rel(torch.cat([f.materialise() for f in fact_fake]), dense_fake),
            "real rows": rel(fact_real.materialise(), dense_real)}
    w_t, b = d.lin1.weight.T.contiguous(), d.lin1.bias
    errs["first layer fake"] = rel(torch.cat([f.first_layer(w_t, b) for f in fact_fake]), d.first_layer(dense_fake))
    errs["first layer real"] = rel(fact_real.first_layer(w_t, b), d.first_layer(dense_real))
    params = list(d.parameters())
    # gradient penalty alone, same α
    reps = len(fact_fake)
    torch.manual_seed(11)
    gp_d = gradient_penalty(d, dense_real.detach().repeat(reps, 1), dense_fake.detach())
    torch.manual_seed(11)
    z_f = torch.cat([f.detach().first_layer(w_t, b) for f in fact_fake])
    gp_f = factored_gradient_penalty(d, fact_real.detach().first_layer(w_t, b).repeat(reps, 1), z_f)
    errs["GP"] = rel(gp_f, gp_d)
    errs["grad D params of GP"] = max(rel(a, c) for a, c in zip(torch.autograd.grad(gp_f, params),
                                                                 torch.autograd.grad(gp_d, params)))
    # L_D and D's gradients
    torch.manual_seed(12)
    ld_d = discriminator_loss(d, dense_real.detach(), dense_fake.detach(), gp_weight)
    torch.manual_seed(12)
    ld_f = factored_discriminator_loss(d, fact_real.detach(), [f.detach() for f in fact_fake], gp_weight)
    errs["L_D"] = rel(ld_f, ld_d)
    errs["grad D params of L_D"] = max(rel(a, c) for a, c in zip(torch.autograd.grad(ld_f, params),
                                                                  torch.autograd.grad(ld_d, params)))
    # L_G and the model's gradients (D frozen as in the G step)
    d.requires_grad_(False)
    lg_d, lg_f = generator_loss(d, dense_fake), factored_generator_loss(d, fact_fake)
    errs["L_G"] = rel(lg_f, lg_d)
    errs["grad model params of L_G"] = max(rel(a, c) for a, c in zip(torch.autograd.grad(lg_f, p.params(),
                                                                                          retain_graph=True),
                                                                      torch.autograd.grad(lg_d, p.params())))
    return errs


@pytest.mark.parametrize("route", ["gram", "direct"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_factored_equals_dense_float64(case, route, monkeypatch):
    monkeypatch.setattr(fac, "use_gram", lambda n, w: route == "gram")
    monkeypatch.setattr(fac, "GRAM_BLOCK", 16)          # h1 = 40: the blocked symmetric Gram is used
    p = random_problem(seed=1)
    errs = compare_losses(p, CASES[case])
    assert max(errs.values()) < TOL, errs


def test_real_rows_sparse_at_small_tau_dense_at_large_tau():
    p = random_problem(seed=2, n_items=400)
    *_, small = both_rows(p, tau=0.002)
    *_, large = both_rows(p, tau=1.0)
    assert small.dense is None and len(small.vals) < 4 * len(p.users) + len(p.pairs[0])
    assert large.dense is not None


def test_sampled_rows_dot_any_row_order_and_duplicates():
    """The G step's SDDMM: entries in any order (real rows are not row-sorted), duplicates kept."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    rows = torch.tensor([3, 0, 5, 3, 0, 1, 3, 5])
    cols = torch.tensor([2, 8, 0, 2, 1, 4, 7, 0])
    got = fac._sampled_rows_dot(a, b, rows, cols, 6)
    assert rel(got, (a[rows] * b[cols]).sum(1)) < TOL


def test_sampled_rows_dot_without_sddmm_falls_back(monkeypatch):
    def unsupported(*args, **kwargs):
        raise NotImplementedError("no SDDMM here")

    a, b = torch.randn(6, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    rows, cols = torch.tensor([3, 0, 5, 3]), torch.tensor([2, 8, 0, 2])
    monkeypatch.setattr(torch.sparse, "sampled_addmm", unsupported)
    assert rel(fac._sampled_rows_dot(a, b, rows, cols, 6), (a[rows] * b[cols]).sum(1)) < TOL


def test_symmetric_product_blocks(monkeypatch):
    monkeypatch.setattr(fac, "GRAM_BLOCK", 3)
    x = torch.randn(7, 8, dtype=torch.float64)
    d = torch.randn(7, 1, dtype=torch.float64)
    assert rel(fac.symmetric_product(x * d, x), (x * d).T @ x) < TOL
    assert rel(fac.gram(x.T), x.T @ x) < TOL


def test_a_wrong_factorisation_is_caught():
    """The comparison can fail: dropping the observed-item correction of the fake rows is detected."""
    p = random_problem(seed=4)
    fu, fi = next(iter(p.views().values()))
    good = factored_fake_rows(fu, fi, p.pairs)
    bad = fac.FactoredRows(good.n, good.n_items, good.lowrank, good.rows[:0], good.cols[:0], good.vals[:0],
                           good.inv_norm)
    dense = fake_rows(fu, fi, p.observed)
    assert rel(good.materialise(), dense) < TOL
    assert rel(bad.materialise(), dense) > 1e-3


@pytest.mark.skipif(not (TIKTOK / "train.json").is_file(), reason=f"TikTok data not found at {TIKTOK}")
def test_tiktok_slice_float64(monkeypatch):
    from mmssl.data import load
    data = load(TIKTOK)
    p = Problem(data.train, {m: x.astype(np.float64) for m, x in data.features.items()}, batch=32, d=16, seed=0)
    monkeypatch.setattr(fac, "use_gram", lambda n, w: True)
    errs = compare_losses(p, dict(tau=0.002))
    assert max(errs.values()) < TOL, errs


def _runs(**overrides):
    data = make_dataset(n_users=300, n_items=200, seed=0)
    base = dict(device="cpu", batch_size=128, **overrides)
    return data, {impl: Run(Config(disc_impl=impl, **base), data, torch.device("cpu"))
                  for impl in ("dense", "factored")}


@pytest.mark.parametrize("overrides", [{}, {"gumbel_tau": 1.0}], ids=["default", "tau=1.0"])
def test_train_step_same_loss_terms_with_dropout(overrides):
    _, runs = _runs(**overrides)
    terms = {}
    for impl, run in runs.items():
        assert run.cfg.d_dropout1 > 0 and run.cfg.dropout > 0
        out = []
        for b in range(3):
            torch.manual_seed(100 + b)
            users, pos, neg = (torch.from_numpy(a) for a in run.sampler.sample())
            out.append(train_step(run.model, run.disc, run.opt, run.opt_d, run.train_t, users, pos, neg,
                                  run.cfg, rebuild=True))
        terms[impl] = torch.stack(out)
    err = ((terms["factored"] - terms["dense"]).abs() / terms["dense"].abs().clamp_min(1e-12)).max()
    assert err < 1e-5, (terms, err)


def test_two_epochs_same_metrics():
    data = make_dataset(n_users=300, n_items=200, seed=0)
    res = {impl: fit(Config(disc_impl=impl, device="cpu", batch_size=128, epochs=2, patience=0), data)
           for impl in ("dense", "factored")}
    keys = [k for k in res["dense"] if k.startswith(("val/", "test/"))]
    assert keys
    for k in keys:
        assert res["factored"][k] == pytest.approx(res["dense"][k], abs=1e-4), k


def test_disc_impl_config_key():
    assert Config().disc_impl == "factored"
    assert Config.from_dict({"disc_impl": "dense"}).disc_impl == "dense"
    with pytest.raises(ConfigError, match="disc_impl"):
        Config.from_dict({"disc_impl": "sparse"})


def test_bench_compare_smoke_asserts_no_dense_rows(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import epoch
    threads = torch.get_num_threads()
    try:
        assert epoch.main(["--compare-disc-impl", "--smoke-test", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "factored: none" in out and "dense: d_step" in out
