"""The generated-graph rebuild (eq. 3): the blocked exact top-k against torch.topk over whole rows.

``mmssl.graph.blocked_topk_cols`` (the CPU default since issue 6) must keep, for every user,
k items whose cosines are the k largest: the same items as one ``torch.topk`` over the whole
row wherever the k-th and (k+1)-th cosine differ by more than float32 rounding, and the
same multiset of k values where items tie exactly.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmssl.graph as graph

from mmssl.graph import (
    block_size,
    blocked_topk_cols,
    generator_graph,
    modality_id_operators,
)

torch.set_num_threads(1)


def cos64(fu, fi):
    return F.normalize(fu.double(), dim=1) @ F.normalize(fi.double(), dim=1).T


def check_is_top_k(cols, fu, fi, k, tol=1e-6):
    """Every row: k distinct items and no unselected item scoring more than ``tol`` above a selected one."""
    s = cos64(fu, fi)
    assert cols.shape == (fu.shape[0], k)
    assert all(len(set(r)) == k for r in cols.tolist())
    sel = torch.zeros_like(s, dtype=torch.bool).scatter_(1, cols, True)
    lowest_kept = s.masked_fill(~sel, float("inf")).amin(1)
    highest_left = s.masked_fill(sel, float("-inf")).amax(1)
    assert bool((highest_left <= lowest_kept + tol).all()), float((highest_left - lowest_kept).max())


def separated_rows(fu, fi, k, gap=1e-5):
    """Users whose k-th and (k+1)-th cosine differ by more than ``gap`` (the top-k set is unambiguous)."""
    top = torch.topk(cos64(fu, fi), min(k + 1, fi.shape[0]), dim=1).values
    if k >= fi.shape[0]:
        return torch.ones(fu.shape[0], dtype=torch.bool)
    return top[:, k - 1] - top[:, k] > gap


@pytest.mark.parametrize("n_users,n_items,d,k,chunk", [
    (300, 1000, 16, 10, 64),      # b = 10, 100 blocks
    (257, 997, 8, 37, 50),        # |I| not a multiple of b: padded block; ragged last chunk
    (64, 500, 4, 1, 7),           # k = 1
    (40, 120, 6, 60, 16),         # k = |I|/2: b = 1 or 2
    (33, 50, 5, 50, 8),           # k = |I|: every item
    (5, 3000, 32, 30, 1),         # one user per chunk
])
def test_blocked_top_k_equals_torch_topk(n_users, n_items, d, k, chunk):
    g = torch.Generator().manual_seed(n_users + n_items + k)
    fu, fi = torch.randn(n_users, d, generator=g), torch.randn(n_items, d, generator=g)
    fun, fin = F.normalize(fu, dim=1), F.normalize(fi, dim=1)
    got = blocked_topk_cols(fun, fin, k, chunk)
    check_is_top_k(got, fu, fi, k)
    want = torch.topk(fun @ fin.T, k, dim=1).indices
    ok = separated_rows(fu, fi, k)
    assert ok.float().mean() > 0.5
    assert torch.equal(torch.sort(got[ok], 1).values, torch.sort(want[ok], 1).values)


def test_block_size_always_leaves_k_blocks():
    for n_items in range(1, 401):
        for k in range(1, n_items + 1):
            b = block_size(n_items, k)
            assert b >= 1 and -(-n_items // b) >= k, (n_items, k, b)
    assert block_size(6710, 67) == 10


def test_blocked_path_does_not_fall_back_to_whole_rows(monkeypatch):
    """On finite scores no selection sees a whole row of |I| scores (the NaN fallback does)."""
    widths = []
    real_topk, real_largest = torch.topk, graph.largest_k

    def spy_topk(x, *a, **kw):
        widths.append(("topk", x.shape[-1]))
        return real_topk(x, *a, **kw)

    def spy_largest(x, k):
        widths.append(("largest_k", x.shape[-1]))
        return real_largest(x, k)

    monkeypatch.setattr(torch, "topk", spy_topk)
    monkeypatch.setattr(graph, "largest_k", spy_largest)
    g = torch.Generator().manual_seed(0)             # its last chunk packs exactly k candidates
    fu, fi = F.normalize(torch.randn(100, 8, generator=g), dim=1), F.normalize(torch.randn(900, 8, generator=g), dim=1)
    blocked_topk_cols(fu, fi, 9, 32)
    assert widths and max(w for _, w in widths) < 900 // 3, widths
    assert {name for name, _ in widths} == {"largest_k"}


def test_largest_k_equals_torch_topk():
    x = torch.randn(30, 50)
    got = graph.largest_k(x, 7)
    assert torch.equal(torch.sort(got, 1).values, torch.sort(torch.topk(x, 7, dim=1).indices, 1).values)
    assert torch.equal(torch.sort(graph.largest_k(x.T.contiguous().T, 7), 1).values, torch.sort(got, 1).values)
    assert torch.equal(torch.sort(graph.largest_k(x, 50), 1).values, torch.arange(50).expand(30, -1))


def test_sorted_pattern_cpu_and_torch_routes_agree():
    g = torch.Generator().manual_seed(2)
    cols = torch.stack([torch.randperm(40, generator=g)[:6] for _ in range(25)])
    cpu = graph.sorted_pattern(cols, 40)
    other = graph._sorted_pattern_torch(cols, 40)                 # the route of non-CPU devices
    assert all(torch.equal(a, b) for a, b in zip(cpu, other))
    items, order = torch.sort(cols.reshape(-1), stable=True)
    users = order // 6
    assert torch.equal(cpu[0], torch.sort(cols, 1).values.reshape(-1))
    assert torch.equal(cpu[2], users)
    assert torch.equal(cpu[1], torch.cat([torch.zeros(1, dtype=torch.long),
                                          torch.cumsum(torch.bincount(items, minlength=40), 0)]))


def test_all_negative_scores_never_pick_the_padding():
    """With every cosine < 0, a padded (score 0) slot would win if the padding were not -inf."""
    g = torch.Generator().manual_seed(3)
    fi = torch.randn(103, 8, generator=g)                 # 103 = not a multiple of the block size
    fi[:, 0] = fi[:, 0].abs() + 3.0
    fu = torch.randn(20, 8, generator=g) * 0.1
    fu[:, 0] = -5.0                                       # all cosines negative
    assert block_size(103, 5) > 1 and 103 % block_size(103, 5)
    cols = blocked_topk_cols(F.normalize(fu, dim=1), F.normalize(fi, dim=1), 5, 8)
    assert int(cols.max()) < 103
    check_is_top_k(cols, fu, fi, 5)


def test_exact_ties_keep_the_same_values():
    """Items with identical views tie exactly: any choice among them, but the same k cosines."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(40, 8, generator=g)
    fi = base[torch.randint(0, 40, (400,), generator=g)]  # every item has ~10 exact duplicates
    fu = torch.randn(50, 8, generator=g)
    fun, fin = F.normalize(fu, dim=1), F.normalize(fi, dim=1)
    s = fun @ fin.T
    got = blocked_topk_cols(fun, fin, 25, 16)
    want = torch.topk(s, 25, dim=1).values
    assert torch.equal(torch.sort(torch.gather(s, 1, got), 1).values, torch.sort(want, 1).values)


def test_a_nan_user_falls_back_alone_and_the_others_stay_exact():
    """A user whose scores are NaN gets torch.topk's answer (not one item k times); the rest of
    its chunk keeps the blocked answer."""
    g = torch.Generator().manual_seed(8)
    fu, fi = torch.randn(10, 4, generator=g), torch.randn(200, 4, generator=g)
    fu[2] = float("nan")
    fun, fin = F.normalize(fu, dim=1), F.normalize(fi, dim=1)
    got = blocked_topk_cols(fun, fin, 6, 10)
    want = torch.topk(fun @ fin.T, 6, dim=1).indices
    assert torch.equal(torch.sort(got, 1).values, torch.sort(want, 1).values)
    assert len(set(got[2].tolist())) == 6
    fi[3] = float("nan")                          # a NaN item: every user's row has a NaN
    got = blocked_topk_cols(F.normalize(fu, dim=1), F.normalize(fi, dim=1), 6, 4)
    assert got.shape == (10, 6) and all(len(set(r)) == 6 for r in got.tolist())


def test_k_outside_1_to_items_is_a_value_error():
    for k in (0, 31):
        with pytest.raises(ValueError, match="k must be in 1..|I|"):
            generator_graph(torch.randn(5, 3), torch.randn(30, 3), k)


def test_generator_graph_select_paths_agree_and_rows_ascend():
    g = torch.Generator().manual_seed(11)
    fu, fi = torch.randn(500, 16, generator=g), torch.randn(700, 16, generator=g)
    a = generator_graph(fu, fi, 7, chunk=128, select="topk")
    b = generator_graph(fu, fi, 7, chunk=128, select="blocked")
    auto = generator_graph(fu, fi, 7, chunk=128)
    assert bool(separated_rows(fu, fi, 7).all())           # this draw has no near-ties: same graphs
    assert torch.equal(a.cols, b.cols) and torch.equal(b.cols, auto.cols)
    assert bool((b.cols[:, 1:] > b.cols[:, :-1]).all())
    for x, y in ((a, b), (a.item_side, b.item_side)):
        assert torch.equal(x.mat.to_dense(), y.mat.to_dense())
        assert torch.equal(x.mat_t.to_dense(), y.mat_t.to_dense())
    with pytest.raises(ValueError, match="select"):
        generator_graph(fu, fi, 7, select="fast")


def test_operators_from_unsorted_and_sorted_columns_are_the_same():
    cols = torch.tensor([[4, 0, 2], [1, 2, 0], [3, 4, 2], [0, 1, 2]])
    a = modality_id_operators(cols, 6)
    b = modality_id_operators(torch.sort(cols, 1).values, 6)
    assert torch.equal(a.cols, torch.sort(cols, 1).values) and torch.equal(b.cols, a.cols)
    for x, y in ((a, b), (a.item_side, b.item_side)):
        assert torch.equal(x.mat.to_dense(), y.mat.to_dense())
        assert torch.equal(x.mat_t.to_dense(), y.mat_t.to_dense())
        assert torch.equal(x.mat.to_dense().T, x.mat_t.to_dense())
    assert torch.equal(a.mat.col_indices(), torch.sort(cols, 1).values.reshape(-1))   # CSR: ascending per row
    assert torch.equal(a.item_side.mat.col_indices(), torch.tensor([0, 1, 3, 1, 3, 0, 1, 2, 3, 2, 0, 2]))
    # item 2 has 4 users, item 5 none: D_i^{-1/2} G^T
    assert torch.allclose(a.item_side.mat.to_dense()[2], torch.full((4,), 0.5))
    assert float(a.item_side.mat.to_dense()[5].abs().sum()) == 0.0
