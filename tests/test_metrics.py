"""Tests of mmssl.metrics against a brute-force per-user pure-Python reference."""
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mmssl.metrics import (KS, METRICS, evaluate, popularity_item_scores, popularity_scores,
                           rank_metrics, ranked_items)


# ----------------------------------------------------------------- reference
def ref_metrics(scores, exclude, truth, ks=KS):
    """Per user: sort by (-score, item id), skip excluded, standard NDCG; mean over users
    with truth. Plain Python on nested lists."""
    S = scores.tolist()
    acc = {f"{n}@{k}": [] for k in ks for n in METRICS}
    for u, row in enumerate(S):
        t = set(int(i) for i in truth[u])
        if not t:
            continue
        ex = set(int(i) for i in exclude[u])
        order = sorted((i for i in range(len(row)) if i not in ex), key=lambda i: (-row[i], i))
        for k in ks:
            top = order[:k]
            hit_pos = [r for r, i in enumerate(top) if i in t]
            h = len(hit_pos)
            dcg = sum(1.0 / math.log2(r + 2) for r in hit_pos)
            idcg = sum(1.0 / math.log2(r + 2) for r in range(min(len(t), k)))
            acc[f"recall@{k}"].append(h / len(t))
            acc[f"precision@{k}"].append(h / k)
            acc[f"ndcg@{k}"].append(dcg / idcg)
            acc[f"hit@{k}"].append(float(h > 0))
    return {key: (sum(v) / len(v) if v else float("nan")) for key, v in acc.items()}


def assert_close(got, want, tol=1e-6):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for key in want:
        if math.isnan(want[key]):
            assert math.isnan(got[key]), key
        else:
            assert abs(got[key] - want[key]) <= tol, (key, got[key], want[key])


def random_sets(rng, n_users, n_items, max_len, p_empty):
    out = []
    for _ in range(n_users):
        if rng.random() < p_empty:
            out.append([])
        else:
            out.append(sorted(rng.choice(n_items, size=rng.integers(1, max_len + 1),
                                         replace=False).tolist()))
    return out


def to_csr(lists, n_items):
    rows = [u for u, l in enumerate(lists) for _ in l]
    cols = [i for l in lists for i in l]
    return sp.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(lists), n_items))


def make_case(seed, n_users=61, n_items=80, tie_levels=5):
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    if tie_levels:
        scores = torch.randint(0, tie_levels, (n_users, n_items), generator=g).float()
    else:
        scores = torch.randn(n_users, n_items, generator=g)
    exclude = random_sets(rng, n_users, n_items, min(45, n_items - 1), 0.1)  # some: < 50 rankable
    truth = [sorted(set(t) | set(rng.choice(e, size=min(1, len(e)), replace=False).tolist()))
             if t else t for t, e in zip(random_sets(rng, n_users, n_items, 12, 0.25), exclude)]
    return scores, exclude, truth


# ----------------------------------------------------------------- agreement
@pytest.mark.parametrize("seed,n_items,tie_levels", [(0, 80, 5), (1, 80, 2), (2, 120, 0),
                                                      (3, 30, 3), (4, 55, 4)])
@pytest.mark.parametrize("kind", ["lists", "csr"])
def test_rank_metrics_matches_reference(seed, n_items, tie_levels, kind):
    scores, exclude, truth = make_case(seed, n_items=n_items, tie_levels=tie_levels)
    assert any(not t for t in truth) and any(set(t) & set(e) for t, e in zip(truth, exclude))
    want = ref_metrics(scores, exclude, truth)
    before = scores.clone()
    if kind == "csr":
        got = rank_metrics(scores, to_csr(exclude, n_items), to_csr(truth, n_items))
    else:
        got = rank_metrics(scores, exclude, truth)
    assert_close(got, want)
    assert torch.equal(scores, before)  # the caller's scores are not modified


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 61, 4096])
def test_evaluate_matches_rank_metrics(seed, chunk_size):
    n_users, n_items = 61, 90
    g = torch.Generator().manual_seed(seed)
    # small integer embeddings: exact float products, many ties (also across the top-K cut)
    U = torch.randint(0, 3, (n_users, 4), generator=g).float()
    I = torch.randint(0, 3, (n_items, 4), generator=g).float()
    _, exclude, truth = make_case(seed + 10, n_users, n_items)
    want = ref_metrics(U @ I.T, exclude, truth)
    got = evaluate(U, I, to_csr(exclude, n_items), to_csr(truth, n_items), chunk_size=chunk_size,
                   prefix="val/")
    assert_close(got, {f"val/{k}": v for k, v in want.items()})
    assert_close(rank_metrics(U @ I.T, exclude, truth), want)


def test_evaluate_continuous_scores_and_lists():
    U, I = torch.randn(50, 8, generator=torch.Generator().manual_seed(5)), torch.randn(70, 8)
    _, exclude, truth = make_case(6, 50, 70)
    want = ref_metrics(U @ I.T, exclude, truth)
    assert_close(evaluate(U, I, exclude, truth, chunk_size=9), want, tol=1e-6)


def test_exclude_list_of_csr():
    n_users, n_items = 40, 60
    g = torch.Generator().manual_seed(3)
    U = torch.randint(0, 3, (n_users, 3), generator=g).float()
    I = torch.randint(0, 3, (n_items, 3), generator=g).float()
    rng = np.random.default_rng(3)
    train = random_sets(rng, n_users, n_items, 15, 0.0)
    val = random_sets(rng, n_users, n_items, 5, 0.2)
    test = random_sets(rng, n_users, n_items, 5, 0.2)
    union = [sorted(set(a) | set(b)) for a, b in zip(train, val)]
    want = ref_metrics(U @ I.T, union, test, ks=(5, 10))
    got = evaluate(U, I, [to_csr(train, n_items), to_csr(val, n_items)], to_csr(test, n_items),
                   ks=(5, 10), chunk_size=13, prefix="test/")
    assert_close(got, {f"test/{k}": v for k, v in want.items()})
    got2 = rank_metrics(U @ I.T, [to_csr(train, n_items), to_csr(val, n_items)], test, ks=(5, 10))
    assert_close(got2, want)
    # excluding only train gives a different answer (val items are rankable again)
    assert evaluate(U, I, to_csr(train, n_items), to_csr(test, n_items), ks=(5, 10)) != {
        k.split("/", 1)[1]: v for k, v in got.items()}


# ----------------------------------------------------------------- hand cases
def test_ndcg_standard_idcg_hand_case():
    # 12 items ranked 0, 2, 1, 3, ..., 11; truth {0, 1, 11}: hits at ranks 1 and 3 of the top 10
    scores = torch.tensor([[12.0, 10.0, 11.0] + [9.0 - i for i in range(9)]])
    got = rank_metrics(scores, [[]], [[0, 1, 11]], ks=(10,))
    dcg = 1.0 + 1.0 / math.log2(4)
    idcg = 1.0 + 1.0 / math.log2(3) + 1.0 / math.log2(4)   # min(|T|, K) = 3 ideal hits
    assert got["ndcg@10"] == pytest.approx(dcg / idcg, abs=1e-9)      # 0.70392...
    assert got["ndcg@10"] == pytest.approx(0.7039180890341347, abs=1e-9)
    assert got["recall@10"] == pytest.approx(2 / 3)
    assert got["precision@10"] == pytest.approx(0.2)
    assert got["hit@10"] == 1.0


def test_excluded_truth_counts_in_denominator():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0]])
    got = rank_metrics(scores, [[0]], [[0, 1]], ks=(1, 2))
    assert got["recall@1"] == pytest.approx(0.5)   # item 1 ranked first, |T| = 2
    assert got["ndcg@2"] == pytest.approx(1.0 / (1.0 + 1.0 / math.log2(3)))
    assert got["hit@2"] == 1.0


def test_all_equal_scores_break_ties_by_lower_id():
    n_users, n_items, k = 3, 100, 10
    scores = torch.zeros(n_users, n_items)
    exclude = [[], [0, 3, 7], [5, 9, 10, 11]]
    expected = [[i for i in range(n_items) if i not in set(e)][:k] for e in exclude]
    assert ranked_items(scores, exclude, k).tolist() == expected
    got = rank_metrics(scores, exclude, expected, ks=(k,))
    assert got[f"recall@{k}"] == 1.0 and got[f"ndcg@{k}"] == pytest.approx(1.0)
    nxt = [[e[-1] + 1] for e in expected]   # the first item just outside the top-k
    assert rank_metrics(scores, exclude, nxt, ks=(k,))[f"hit@{k}"] == 0.0
    U, I = torch.ones(n_users, 2), torch.ones(n_items, 2)
    assert evaluate(U, I, exclude, expected, ks=(k,), chunk_size=2)[f"recall@{k}"] == 1.0


def test_fewer_rankable_items_than_k():
    scores = torch.arange(6.0).flip(0)[None]           # item 0 best
    got = rank_metrics(scores, [[0, 1, 2, 3]], [[1, 5]], ks=(10,))
    assert got["recall@10"] == pytest.approx(0.5)      # item 5 is hit; excluded item 1 never
    assert got["precision@10"] == pytest.approx(0.1)
    assert ranked_items(scores, [[0, 1, 2, 3]], 10).tolist() == [[4, 5, 0, 1, 2, 3]]


def test_no_truth_gives_nan_without_crash():
    scores = torch.rand(4, 20)
    got = rank_metrics(scores, [[1]] * 4, [[]] * 4)
    assert len(got) == len(KS) * len(METRICS) and all(math.isnan(v) for v in got.values())
    got = evaluate(torch.rand(4, 3), torch.rand(20, 3), None, sp.csr_matrix((4, 20)), prefix="v/")
    assert "v/recall@20" in got and all(math.isnan(v) for v in got.values())


def test_users_without_truth_are_skipped():
    scores = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    got = rank_metrics(scores, [[], []], [[0], []], ks=(1,))
    assert got["recall@1"] == 1.0          # not 0.5: the second user is not counted


def test_popularity_scores():
    train = sp.csr_matrix(np.array([[1, 0, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]))
    assert popularity_item_scores(train).tolist() == [3.0, 1.0, 1.0, 0.0]
    P = popularity_scores(train, 5)
    assert P.shape == (5, 4) and P[4].tolist() == [3.0, 1.0, 1.0, 0.0]
    # ties between items 1 and 2 go to item 1
    assert rank_metrics(P[:1], [[0]], [[1]], ks=(1,))["hit@1"] == 1.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        rank_metrics(torch.rand(2, 5), [[5], []], [[0], [1]])
    with pytest.raises(ValueError):
        rank_metrics(torch.rand(2, 5), [[]], [[0], [1]])
    with pytest.raises(ValueError):
        evaluate(torch.rand(2, 3), torch.rand(5, 3), sp.csr_matrix((3, 5)), [[0], [1]])


def test_tie_straddling_the_cut_only():
    # top K-1 values distinct, then a large group of equal values across the K-th position:
    # only the cut-off check can notice that the K-th item must be the LOWEST tied id
    n_users, n_items, k = 40, 300, 10
    g = torch.Generator().manual_seed(7)
    scores = torch.zeros(n_users, n_items)
    expected = []
    for u in range(n_users):
        perm = torch.randperm(n_items, generator=g)
        top = perm[:k - 1]
        scores[u, top] = torch.arange(k - 1, 0, -1).float() + 1.0   # distinct, all > 1
        scores[u, perm[k - 1:]] = 1.0 - 2.0 * (perm[k - 1:] % 2 == 1).float()  # even ids tie
        tied = sorted(i for i in perm[k - 1:].tolist() if i % 2 == 0)
        expected.append(top.tolist() + tied[:1])
    assert ranked_items(scores, None, k).tolist() == expected
    U = scores  # evaluate on the same scores: identity item embeddings
    got = evaluate(U, torch.eye(n_items), None, [e[-1:] for e in expected], ks=(k,), chunk_size=16)
    assert got[f"hit@{k}"] == 1.0
    assert_close(rank_metrics(scores, None, [e[-1:] for e in expected], ks=(k,)),
                 ref_metrics(scores, [[]] * n_users, [e[-1:] for e in expected], ks=(k,)))


def test_rank_sums_building_block():
    from mmssl.metrics import _rank_sums
    scores, exclude, truth = make_case(11, 30, 70)
    want = ref_metrics(scores, exclude, truth)
    rows = torch.tensor([u for u, e in enumerate(exclude) for _ in e])
    cols = torch.tensor([i for e in exclude for i in e])
    truth_bool = torch.zeros(scores.shape, dtype=torch.bool)
    for u, t in enumerate(truth):
        truth_bool[u, t] = True
    sums, count = _rank_sums(scores.clone(), rows, cols, truth_bool)
    assert int(count) == sum(1 for t in truth if t)
    assert_close({k: float(v) / int(count) for k, v in sums.items()}, want)
