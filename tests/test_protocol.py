"""The evaluation protocol, pinned on tiny cases whose right answers are computed by hand.

Rules (shared/design/mmssl.md, "Evaluation" and "Objective and training"): validation
excludes the user's train items only; test excludes train AND validation items; users
without ground truth in the split are skipped; NDCG's IDCG runs over min(|truth|, K) ideal
hits; ties are broken by item id; the model is selected on validation Recall@20 and test is
evaluated once, with the selected epoch's weights and generated graphs.
"""
from __future__ import annotations

import math
import types

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn as nn

from mmssl.config import Config
from mmssl.data import Dataset
from mmssl.metrics import evaluate, rank_metrics
from mmssl.step import LOSS_TERMS
from mmssl.train import Run, fit

N_ITEMS = 12


def csr(lists, n_items=N_ITEMS):
    rows = [u for u, items in enumerate(lists) for _ in items]
    cols = [i for items in lists for i in items]
    return sp.csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(len(lists), n_items))


class FixedScores(nn.Module):
    """Stands in for the model: h_user = one-hot rows, h_item = S^T, so h_user @ h_item.T = S."""

    def __init__(self, scores: np.ndarray):
        super().__init__()
        self.s = torch.tensor(scores, dtype=torch.float32)

    def forward(self):
        return types.SimpleNamespace(h_user=torch.eye(self.s.shape[0]), h_item=self.s.T.contiguous())


def hand_run():
    """4 users, 12 items, every user ranks items by id (item 0 first).

    user 0: train {0}, val {2}, test {1}
    user 1: train {0}, val {1}, test {2}
    user 2: train {3}, no val, no test      -> skipped in both splits
    user 3: train {0}, no val, test {5}     -> skipped in val only
    """
    train, val, test = csr([[0], [0], [3], [0]]), csr([[2], [1], [], []]), csr([[1], [2], [], [5]])
    data = Dataset(4, N_ITEMS, train, val, test, {}, "hand")
    run = Run(Config(modalities=[], embed_dim=4, n_heads=1, batch_size=4, device="cpu"), data,
              torch.device("cpu"))
    run.model = FixedScores(np.tile(np.arange(N_ITEMS, 0, -1, dtype=float), (4, 1)))
    return run


def test_validation_excludes_train_items_only():
    """Val ranks (train removed): user 0 -> 1, 2, ... so val item 2 sits at rank 1 (test item 1 stays
    rankable above it); user 1 -> val item 1 at rank 0; users 2, 3 have no val truth (skipped)."""
    got = hand_run().evaluate("val")
    assert got["val/ndcg@10"] == pytest.approx((1 / math.log2(3) + 1.0) / 2, abs=1e-12)
    assert got["val/recall@10"] == pytest.approx(1.0)
    assert got["val/precision@10"] == pytest.approx(0.1)  # 2 users, not 4


def test_test_split_excludes_train_and_validation_items():
    """Test ranks (train and val removed): user 0 -> 1, 3, ... (test item 1 at rank 0); user 1 ->
    2, 3, ... (test item 2 at rank 0, not rank 1 behind its val item); user 3 -> 1, 2, 3, 4, 5
    (test item 5 at rank 4); user 2 skipped."""
    got = hand_run().evaluate("test")
    assert got["test/ndcg@10"] == pytest.approx((1.0 + 1.0 + 1 / math.log2(6)) / 3, abs=1e-12)
    assert got["test/hit@10"] == pytest.approx(1.0)
    assert got["test/precision@10"] == pytest.approx(0.1)  # 3 users counted


def test_users_without_ground_truth_are_skipped():
    """A user with no truth item adds nothing to the mean (not a 0): 1 of 2 users hit, not 1 of 3."""
    scores = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    got = rank_metrics(scores, [[], [], [0]], [[0], [2], []], ks=(1,))
    assert got["recall@1"] == pytest.approx(0.5) and got["hit@1"] == pytest.approx(0.5)
    got = evaluate(torch.eye(3), scores.T.contiguous(), [[], [], [0]], [[0], [2], []], ks=(1,), chunk_size=1)
    assert got["recall@1"] == pytest.approx(0.5)


def test_ndcg_idcg_over_min_truth_and_k():
    """README differences table, row 6 (NDCG's ideal term from the retrieved hits): IDCG over
    min(|T|, K) ideal hits. |T| = 3 > K = 2 with the truth at ranks 0 and 1: NDCG@2 = 1 (not
    normalised by 3 ideal hits); one hit at rank 1 of |T| = 2: (1/log2 3)/(1 + 1/log2 3), not 1."""
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    assert rank_metrics(scores, [[]], [[0, 1, 4]], ks=(2,))["ndcg@2"] == pytest.approx(1.0, abs=1e-12)
    one_hit = rank_metrics(scores, [[]], [[1, 4]], ks=(2,))["ndcg@2"]
    assert one_hit == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)), abs=1e-12)
    got = evaluate(torch.eye(1), scores.T.contiguous(), [[]], [[1, 4]], ks=(2,))
    assert got["ndcg@2"] == pytest.approx(one_hit, abs=1e-12)


def test_ties_broken_by_lower_item_id_at_the_cut():
    """Items 1..4 tie; with K = 2 the list is 0, 1 (lowest id wins), so truth {2} misses and {1} hits."""
    scores = torch.tensor([[9.0, 5.0, 5.0, 5.0, 5.0, 1.0]])
    for truth, hit in (([1], 1.0), ([2], 0.0), ([4], 0.0)):
        assert rank_metrics(scores, [[]], [truth], ks=(2,))["hit@2"] == hit, truth
        assert evaluate(torch.eye(1), scores.T.contiguous(), [[]], [truth], ks=(2,))["hit@2"] == hit, truth
    # the tie is broken among the rankable items: excluding item 1 brings item 2 in
    assert rank_metrics(scores, [[1]], [[2]], ks=(2,))["hit@2"] == 1.0


# ------------------------------------------------------------------ model selection
@pytest.fixture
def scripted(monkeypatch, tiny, small_cfg):
    """fit() with a scripted validation curve: epoch e sets every weight-marker to e and every
    generated-graph column to e; val/recall@20 follows ``curve``; test reads the markers."""
    calls = {"test": []}

    def make(curve):
        def train_epoch(self, *args, **kwargs):
            self.epoch += 1
            with torch.no_grad():
                self.model.user_emb.fill_(float(self.epoch))
            self.model.load_graph_state({m: torch.full((self.data.n_users, 2), self.epoch)
                                         for m in self.model.modalities})
            return {k: 0.0 for k in LOSS_TERMS}

        def evaluate_(self, split, *args, **kwargs):
            marker = self.model.user_emb[0, 0].item()
            if split == "test":
                cols = {int(g.cols[0, 0]) for g in self.model.graphs.values()}
                calls["test"].append((marker, cols))
                return {"test/recall@20": marker}
            return {"val/recall@20": curve[self.epoch - 1], "val/ndcg@20": marker}

        monkeypatch.setattr(Run, "train_epoch", train_epoch)
        monkeypatch.setattr(Run, "evaluate", evaluate_)
        return calls

    return make


def test_selection_on_validation_and_test_once_at_the_selected_epoch(scripted, tiny, small_cfg):
    """README differences table, row 5 (best epoch chosen on test recall): the best epoch is the
    first with the highest val/recall@20 (epoch 2 of [.1, .4, .2, .4, .3]); test is evaluated once,
    afterwards, with epoch 2's weights and generated graphs; the result's val metrics are epoch 2's."""
    calls = scripted([0.1, 0.4, 0.2, 0.4, 0.3])
    result = fit(small_cfg.replace(epochs=5, patience=0), tiny)
    assert result["best_epoch"] == 2 and result["epochs_run"] == 5 and not result["stopped_early"]
    assert calls["test"] == [(2.0, {2})]
    assert result["test/recall@20"] == 2.0
    assert result["val/recall@20"] == 0.4 and result["val/ndcg@20"] == 2.0


def test_early_stopping_counts_epochs_without_a_better_validation_value(scripted, tiny, small_cfg):
    """patience 3: epochs 3, 4, 5 do not beat epoch 2 -> stop after epoch 5 (epoch 6's 0.9 never seen)."""
    calls = scripted([0.1, 0.4, 0.2, 0.3, 0.4, 0.9])
    result = fit(small_cfg.replace(epochs=6, patience=3), tiny)
    assert result["epochs_run"] == 5 and result["best_epoch"] == 2 and result["stopped_early"]
    assert calls["test"] == [(2.0, {2})]


def test_bpr_batches_distinct_users_train_positive_uniform_unobserved_negative():
    """BPR sampling: a batch holds distinct users with train items; each has one positive from its
    train items and one negative drawn uniformly among the items NOT in its train items; an epoch
    is ceil(|train| / batch_size) batches."""
    from mmssl.step import BatchSampler

    lists = [[0, 1, 2], [3], [], [0, 4, 5, 6, 7, 8], [9, 10]]   # user 2 has no train item
    train = csr(lists)
    sampler = BatchSampler(train, 3, np.random.default_rng(0))
    assert sampler.n_batches == math.ceil(12 / 3)
    negatives = {u: [] for u in range(5)}
    for _ in range(1500):
        users, pos, neg = sampler.sample()
        assert len(set(users.tolist())) == 3 and 2 not in users.tolist()
        for u, p, n in zip(users.tolist(), pos.tolist(), neg.tolist()):
            assert p in lists[u] and n not in lists[u]
            negatives[u].append(n)
    counts = np.bincount(negatives[3], minlength=N_ITEMS)    # 6 unobserved items, ~1/6 each
    unobserved = [i for i in range(N_ITEMS) if i not in lists[3]]
    assert (counts[lists[3]] == 0).all()
    assert np.abs(counts[unobserved] / counts.sum() - 1 / 6).max() < 0.05


def test_epoch_losses_are_the_mean_over_its_batches(tiny, small_cfg, monkeypatch):
    """train/* of an epoch = mean over its ceil(|train|/batch_size) batches of each term; a term that
    turns NaN is named (the component, not the total, at a tie)."""
    import mmssl.train
    from mmssl.errors import DivergedError

    values = []

    def fake_step(*args, **kwargs):
        values.append(len(values) + 1.0)
        return torch.arange(len(LOSS_TERMS), dtype=torch.float32) + values[-1]

    monkeypatch.setattr(mmssl.train, "train_step", fake_step)
    run = Run(small_cfg, tiny, torch.device("cpu"))
    n = run.sampler.n_batches
    means = run.train_epoch()
    assert len(values) == n == math.ceil(tiny.train.nnz / small_cfg.batch_size)
    assert means == {k: pytest.approx((n + 1) / 2 + j) for j, k in enumerate(LOSS_TERMS)}

    def nan_step(*args, **kwargs):
        t = torch.ones(len(LOSS_TERMS))
        t[0] = t[3] = float("nan")
        return t

    monkeypatch.setattr(mmssl.train, "train_step", nan_step)
    with pytest.raises(DivergedError) as err:
        run.train_epoch()
    assert err.value.term == LOSS_TERMS[3] and err.value.epoch == 2


@pytest.mark.parametrize("with_truth", [[0, 2, 4], [0, 2, 3], [0, 2, 3, 5], [1, 2, 3, 4, 5], [3]])
@pytest.mark.parametrize("chunk_size", [2, 64])
def test_evaluate_scores_exactly_the_users_with_truth(with_truth, chunk_size):
    """Only the users with truth are scored, each with ITS OWN row of scores, whether they form a
    contiguous block (the sliced fast path) or not, in one chunk or several."""
    n_users, n_items = 6, 9
    g = torch.Generator().manual_seed(len(with_truth) + chunk_size)
    U, I = torch.randn(n_users, 4, generator=g), torch.randn(n_items, 4, generator=g)
    truth = [[(u + 3) % n_items, (2 * u) % n_items] if u in with_truth else [] for u in range(n_users)]
    exclude = [[(u + 1) % n_items] for u in range(n_users)]
    S = (U @ I.T).tolist()
    per_user = []
    for u in with_truth:   # by hand: rank the non-excluded items, NDCG@3 with IDCG over min(|T|, 3)
        order = sorted((i for i in range(n_items) if i not in exclude[u]), key=lambda i: (-S[u][i], i))[:3]
        dcg = sum(1 / math.log2(r + 2) for r, i in enumerate(order) if i in truth[u])
        per_user.append(dcg / sum(1 / math.log2(r + 2) for r in range(min(len(set(truth[u])), 3))))
    got = evaluate(U, I, exclude, truth, ks=(3,), chunk_size=chunk_size)
    assert got["ndcg@3"] == pytest.approx(float(np.mean(per_user)), abs=1e-9)
