"""Per-user test metrics: the evaluator's per-user rows average to its means (to 1e-12),
match a one-user-at-a-time ``rank_metrics``, and ``fit(per_user=True)`` changes nothing else."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from mmssl.metrics import evaluate, metric_names, rank_metrics
from mmssl.train import fit


def _case(seed=0, n_users=60, n_items=40):
    g = torch.Generator().manual_seed(seed)
    U = torch.randint(-2, 3, (n_users, 4), generator=g).double()  # integer scores: many ties
    I = torch.randint(-2, 3, (n_items, 4), generator=g).double()
    rng = np.random.default_rng(seed)
    ex = sp.random(n_users, n_items, density=0.1, random_state=rng, format="csr")
    tr = sp.random(n_users, n_items, density=0.05, random_state=rng, format="csr")
    tr = tr - tr.multiply(ex.astype(bool))
    return U, I, ex, sp.csr_matrix(tr)


def test_per_user_rows_average_to_the_means_and_match_each_user():
    U, I, ex, tr = _case()
    plain = evaluate(U, I, ex, tr, chunk_size=7, prefix="test/")
    means, rows = evaluate(U, I, ex, tr, chunk_size=7, prefix="test/", per_user=True)
    assert means == plain
    users = np.flatnonzero(np.diff(tr.indptr) > 0)
    assert 0 < users.size < U.shape[0], "the case must have users without truth"
    np.testing.assert_array_equal(rows["user"], users)
    assert list(rows) == ["user"] + metric_names(prefix="test/")
    for k in means:
        assert rows[k].dtype == np.float64 and rows[k].shape == users.shape
        assert abs(rows[k].mean() - means[k]) < 1e-12, k
    for j, u in enumerate(users[:15]):
        one = rank_metrics(U[u:u + 1] @ I.T, ex[u], tr[u])
        for name, v in one.items():
            assert abs(rows[f"test/{name}"][j] - v) < 1e-12, (u, name)


def test_per_user_no_truth():
    means, rows = evaluate(torch.rand(3, 2), torch.rand(5, 2), None, sp.csr_matrix((3, 5)), per_user=True)
    assert all(np.isnan(v) for v in means.values()) and rows["user"].size == 0


def test_fit_per_user(tiny, small_cfg):
    cfg = small_cfg.replace(adversarial=False)
    plain = fit(cfg, tiny)
    res = fit(cfg, tiny, per_user=True)
    pu = res.pop("per_user")
    assert "per_user" not in plain
    same = [k for k in plain if k.startswith(("test/", "val/"))]
    assert {k: res[k] for k in same} == {k: plain[k] for k in same}
    np.testing.assert_array_equal(pu["user"], np.flatnonzero(np.diff(tiny.test.indptr) > 0))
    for k in metric_names(prefix="test/"):
        assert abs(np.mean(pu[k]) - res[k]) < 1e-12, k
