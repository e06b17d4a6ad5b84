"""README "What differs from the released code": rows 1 and 7 (the others are pinned elsewhere).

Where each row of the table is pinned (a test that fails when that defect comes back):

1. graphs rebuilt from the previous batch only / empty / k = 0 -> this file (``test_row1_*``)
2. attention builds K from Q, no value path -> test_equations.py::test_inter_modal_attention_softmax_over_key_modalities
3. LeakyReLU(True), slope 1 -> test_equations.py::test_discriminator_widths_layer_order_and_slope_eval
4. Gumbel: only the noise divided by τ -> test_equations.py::test_real_rows_gumbel_softmax_plus_zeta_cosine
5. best epoch chosen on test -> test_protocol.py::test_selection_on_validation_and_test_once_at_the_selected_epoch
6. NDCG's ideal term from the retrieved hits -> test_protocol.py::test_ndcg_idcg_over_min_truth_and_k
7. dense U x I, two forwards per batch, process-pool evaluator -> this file (``test_row7_*``)
"""
from __future__ import annotations

import numpy as np
import torch

import mmssl.graph
import mmssl.metrics
import mmssl.train
from mmssl.graph import generator_graph, topk_count
from mmssl.model import MMSSL
from mmssl.step import LOSS_TERMS, train_step
from mmssl.train import Run


def _batch(run):
    return tuple(torch.from_numpy(a) for a in run.sampler.sample())


def test_row1_rebuilt_every_refresh_every_batches_across_epochs(tiny, small_cfg, monkeypatch):
    """Row 1: the graphs are rebuilt every T = refresh_every batches, counted over the whole run
    (global step, not reset per epoch): with T = 3 the flags are step % 3 == 0."""
    flags = []

    def fake_step(*args, **kwargs):
        flags.append(kwargs["rebuild"] if "rebuild" in kwargs else args[9])
        return torch.zeros(len(LOSS_TERMS))

    monkeypatch.setattr(mmssl.train, "train_step", fake_step)
    run = Run(small_cfg.replace(refresh_every=3), tiny, torch.device("cpu"))
    n = run.sampler.n_batches
    assert n >= 4
    run.train_epoch()
    run.train_epoch()
    assert flags == [s % 3 == 0 for s in range(2 * n)]


def test_row1_generated_graphs_cover_every_user_with_top_k(tiny, small_cfg):
    """Row 1: a rebuild computes G^m for ALL users (not the batch's users), each with exactly
    k = max(1, round(rate·|I|)) items: the top-k cosine items of the pre-step views; a batch
    without rebuild keeps them."""
    cfg = small_cfg.replace(topk_rate=0.05, refresh_every=2, dropout=0.0)  # no dropout draws: same views
    run = Run(cfg, tiny, torch.device("cpu"))
    ref = Run(cfg, tiny, torch.device("cpu")).model            # same seed: same weights
    views = ref.modality_views()
    k = topk_count(cfg.topk_rate, tiny.n_items)
    assert k == 4
    users, pos, neg = _batch(run)
    train_step(run.model, run.disc, run.opt, run.opt_d, run.train_t, users, pos, neg, cfg, rebuild=True)
    for m in ref.modalities:
        fu = views.f_user[m].detach().double().numpy()
        fi = views.f_item[m].detach().double().numpy()
        has = np.linalg.norm(fu, axis=1) > 0                     # users without train items: all-zero rows
        assert has.sum() > tiny.n_users // 2
        cos = (fu[has] / np.linalg.norm(fu[has], axis=1, keepdims=True)) @ (
            fi / np.maximum(np.linalg.norm(fi, axis=1, keepdims=True), 1e-12)).T   # items without users: 0
        want = [set(np.argsort(-row)[:k].tolist()) for row in cos]
        got = [set(r) for r in run.model.graphs[m].cols.tolist()]
        assert [s for s, h in zip(got, has) if h] == want, m
        assert len(got) == tiny.n_users and all(len(s) == k for s in got)
    before = {m: g.cols.clone() for m, g in run.model.graphs.items()}
    train_step(run.model, run.disc, run.opt, run.opt_d, run.train_t, *_batch(run), cfg, rebuild=False)
    assert all(torch.equal(before[m], g.cols) for m, g in run.model.graphs.items())


def test_row1_k_never_rounds_to_zero():
    """Row 1: k = max(1, round(rate·|I|)); at Baby's size (7050 items) a small rate gives 1, not 0."""
    assert topk_count(0.00005, 7050) == 1 and topk_count(0.0001, 7050) == 1
    assert topk_count(0.01, 7050) == 70 and topk_count(0.05, 80) == 4 and topk_count(0.07, 80) == 6


def test_row7_one_forward_pass_per_batch(tiny, small_cfg, monkeypatch):
    """Row 7: one forward pass with gradients per batch (eqs. 1-2 once, eqs. 4-7 once), with and
    without a graph rebuild; the D step reuses its rows."""
    counts = {"modality_views": 0, "propagate": 0}
    for name in counts:
        real = getattr(MMSSL, name)

        def spy(self, *a, _real=real, _name=name, **k):
            counts[_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(MMSSL, name, spy)
    run = Run(small_cfg, tiny, torch.device("cpu"))
    for rebuild in (True, False):
        counts.update(modality_views=0, propagate=0)
        train_step(run.model, run.disc, run.opt, run.opt_d, run.train_t, *_batch(run), small_cfg, rebuild=rebuild)
        assert counts == {"modality_views": 1, "propagate": 1}, rebuild


def test_row7_sparse_csr_operators(tiny, small_cfg):
    """Row 7: the observed graph, its transposes and the generated graphs are torch sparse CSR."""
    run = Run(small_cfg, tiny, torch.device("cpu"))
    run.model(rebuild=True)
    mats = [run.model.a_u.mat, run.model.a_u.mat_t, run.model.a_i.mat, run.model.a_i.mat_t, run.train_t]
    for g in run.model.graphs.values():
        mats += [g.mat, g.mat_t, g.item_side.mat, g.item_side.mat_t]
    assert all(m.layout == torch.sparse_csr for m in mats)


def test_row7_rebuild_and_evaluation_are_chunked_over_users(tiny, small_cfg, monkeypatch):
    """Row 7: no |U| x |I| score matrix: the graph rebuild and the evaluation score at most
    ``eval_chunk`` users at a time (and give the same graphs / metrics as one big chunk)."""
    rows_seen = []
    real_topk, real_cand = torch.topk, mmssl.metrics._candidates

    def topk_spy(x, *a, **k):
        rows_seen.append(x.shape[0])
        return real_topk(x, *a, **k)

    def cand_spy(scores, *a, **k):
        rows_seen.append(scores.shape[0])
        return real_cand(scores, *a, **k)

    real_largest = mmssl.graph.largest_k

    def largest_spy(x, k):                 # the CPU rebuild's selections (blocked top-k)
        rows_seen.append(x.shape[0])
        return real_largest(x, k)

    fu, fi = torch.randn(50, 8), torch.randn(30, 8)
    whole = generator_graph(fu, fi, 3, chunk=1000).cols
    monkeypatch.setattr(torch, "topk", topk_spy)
    monkeypatch.setattr(mmssl.metrics, "_candidates", cand_spy)
    monkeypatch.setattr(mmssl.graph, "largest_k", largest_spy)
    assert torch.equal(generator_graph(fu, fi, 3, chunk=16).cols, whole)
    assert rows_seen and max(rows_seen) <= 16
    cfg = small_cfg.replace(eval_chunk=16)
    run = Run(cfg, tiny, torch.device("cpu"))
    rows_seen.clear()
    chunked = run.evaluate("val")
    assert rows_seen and max(rows_seen) <= 16
    monkeypatch.undo()
    run.model.graphs = {}
    big = Run(small_cfg.replace(eval_chunk=4096), tiny, torch.device("cpu")).evaluate("val")
    assert chunked == big
