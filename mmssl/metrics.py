"""Full-ranking top-K metrics: Recall, Precision, NDCG and Hit at K (on the tensors' device).

For one user with ground-truth set T (|T| >= 1) and ranked list r_0, r_1, ... (excluded
items removed, ties broken by LOWER item id first), let hit_r = 1[r_r in T]:

* Recall@K    = sum_{r<K} hit_r / |T|
* Precision@K = sum_{r<K} hit_r / K
* Hit@K       = 1[sum_{r<K} hit_r > 0]
* NDCG@K      = DCG@K / IDCG@K,  DCG@K = sum_{r<K} hit_r / log2(r + 2),
                IDCG@K = sum_{r < min(|T|, K)} 1 / log2(r + 2)   (standard definition; the
                released MMSSL code took IDCG from the retrieved hits, which inflates it).

Every metric is averaged over the users with at least one truth item; users without truth
are skipped (NaN everywhere when no user has truth). Excluded items (train, and val at test
time) get score -inf: they are never hits, but an excluded truth item still counts in |T|.
A user with fewer than K rankable items gets -inf items at the tail of the list; they never
count as hits (nor does any item whose own score is -inf). Scores must not contain NaN.

Exact tie order at ~topk cost: ``topk(K+1)`` is taken (tie order arbitrary). Rows whose
K+1 candidate values are all distinct are final. In a row with equal values inside its top K,
runs of equal values are re-sorted by id (one small integer sort). The selected SET can only
be wrong when the K-th and (K+1)-th values are equal (a tie straddles the cut); only those
rare rows are redone with a stable full sort. ``evaluate`` keeps just the topk candidates per
chunk and does all of this once at the end (re-scoring the few cut-tied rows), so its chunk
loop runs without a device->host synchronisation.

Building blocks: ``_rank_rows`` (per-row metrics of a score block), ``_rank_sums`` (their
sums over users with truth, COO exclusion + dense bool truth), ``ranked_items`` (the lists).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from mmssl.data import flat_keys

KS = (10, 20, 50)
METRICS = ("recall", "precision", "ndcg", "hit")


def metric_names(ks=KS, prefix: str = "") -> list[str]:
    """Result keys in the column order of the per-row metric matrix: ``f"{prefix}{name}@{k}"``."""
    return [f"{prefix}{name}@{k}" for k in ks for name in METRICS]


def _check_ks(ks) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    return ks


# --------------------------------------------------------------------------- inputs
def _binary_csr(m, shape, name: str) -> sp.csr_matrix:
    """Canonical 0/1 CSR (sorted indices, no duplicates, no stored zeros) of a scipy matrix."""
    if m.shape != shape:
        raise ValueError(f"{name}: sparse matrix has shape {m.shape}, expected {shape}")
    c = sp.csr_matrix(m, copy=True)
    c.sum_duplicates()
    c.eliminate_zeros()
    c.sort_indices()
    return sp.csr_matrix((np.ones(c.nnz, dtype=np.float32), c.indices.astype(np.int64),
                          c.indptr.astype(np.int64)), shape=shape)


def _as_csr(x, n_rows: int, n_cols: int, name: str) -> sp.csr_matrix:
    """None | scipy sparse matrix | list of sparse matrices (union) | per-user lists of ids."""
    shape = (int(n_rows), int(n_cols))
    if x is None:
        return sp.csr_matrix(shape, dtype=np.float32)
    if sp.issparse(x):
        return _binary_csr(x, shape, name)
    if isinstance(x, (list, tuple)) and len(x) > 0 and all(sp.issparse(e) for e in x):
        total = _binary_csr(x[0], shape, name)
        for e in x[1:]:
            total = total + _binary_csr(e, shape, name)
        return _binary_csr(total, shape, name)
    if len(x) != shape[0]:
        raise ValueError(f"{name}: {len(x)} per-user lists for {shape[0]} users")
    parts = [np.asarray(u, dtype=np.int64).ravel() for u in x]
    lengths = np.fromiter((p.size for p in parts), dtype=np.int64, count=len(parts))
    cols = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if cols.size and (cols.min() < 0 or cols.max() >= shape[1]):
        raise ValueError(f"{name}: item ids must lie in [0, {shape[1]})")
    rows = np.repeat(np.arange(shape[0], dtype=np.int64), lengths)
    coo = sp.coo_matrix((np.ones(cols.size, dtype=np.float32), (rows, cols)), shape=shape)
    return _binary_csr(coo, shape, name)


def _csr_flat_keys(c: sp.csr_matrix, device) -> torch.Tensor:
    """Row-major flat indices ``row * n_cols + col`` of the stored entries, on ``device``."""
    return torch.as_tensor(flat_keys(c), device=device)


def popularity_item_scores(train_csr, device=None) -> torch.Tensor:
    """Item popularity baseline: float32 [n_items], the number of train users of each item."""
    c = _binary_csr(train_csr, train_csr.shape, "train_csr")
    counts = np.bincount(c.indices, minlength=c.shape[1]).astype(np.float32)
    return torch.as_tensor(counts, device=device)


def popularity_scores(train_csr, n_users_or_rows: int, device=None) -> torch.Tensor:
    """Popularity scores as a [n, n_items] matrix: ``popularity_item_scores`` broadcast to
    every row (an expanded, read-only view; ``rank_metrics`` copies the rows it ranks)."""
    return popularity_item_scores(train_csr, device).expand(int(n_users_or_rows), -1)


# --------------------------------------------------------------------------- core
def _stable_topk(scores: torch.Tensor, kmax: int):
    """Exact top-kmax by (score desc, id asc): a stable full sort (the slow, exact path)."""
    vals, idx = torch.sort(scores, dim=1, descending=True, stable=True)
    return vals[:, :kmax], idx[:, :kmax]


def _candidates(scores: torch.Tensor, kmax: int, out=None):
    """Stage 1, per chunk (~ topk cost): ``topk(kmax + 1)``, values descending, tie order
    arbitrary; when kmax >= n_items, the exact stable full sort instead (width n_items)."""
    if kmax >= scores.shape[1]:
        vals, idx = torch.sort(scores, dim=1, descending=True, stable=True)
        if out is None:
            return vals, idx
        out[0].copy_(vals), out[1].copy_(idx)
        return out
    return torch.topk(scores, kmax + 1, dim=1, largest=True, sorted=True, out=out)


def _exact_order(vals_w, idx_w, kmax, n_items, rescore, chunk_size=2048):
    """Stage 2 (batched over all rows): exact top-kmax ordered by (score desc, id asc).

    Only rows with a tie among their candidate values are touched (one host sync finds
    them). If the kmax-th and (kmax+1)-th values are equal, an unselected item shares the
    cut-off score and the SET may miss a lower id: such a row is redone by a stable full sort
    of ``rescore(rows)`` (excluded scores already -inf; a second sync). Otherwise the set is
    exact and only runs of equal values are re-sorted by id: one integer sort of
    ``run_id * n_items + id``.
    """
    vals, idx = vals_w[:, :kmax], idx_w[:, :kmax]
    tie = (vals[:, 1:] == vals[:, :-1]).any(1)
    if vals_w.shape[1] > kmax:
        cut = vals_w[:, kmax] == vals_w[:, kmax - 1]
        tie = tie | cut
    rows = tie.nonzero().squeeze(1)
    if rows.numel() == 0:
        return vals, idx
    v, i = vals.index_select(0, rows), idx.index_select(0, rows)
    if vals_w.shape[1] > kmax:
        pos = cut.index_select(0, rows).nonzero().squeeze(1)
        for s in range(0, pos.numel(), chunk_size):
            p = pos[s:s + chunk_size]
            v2, i2 = _stable_topk(rescore(rows.index_select(0, p)), kmax)
            v.index_copy_(0, p, v2.to(v.dtype)), i.index_copy_(0, p, i2)
    run = torch.zeros_like(i)  # run id of equal values (values are sorted descending)
    run[:, 1:] = (v[:, 1:] != v[:, :-1]).cumsum(1)
    run *= n_items
    i = torch.sort(run + i, dim=1).values - run
    return vals.index_copy(0, rows, v), idx.index_copy(0, rows, i)


def _row_metrics(vals, idx, truth_keys, n_truth, n_items, ks) -> torch.Tensor:
    """Per-row metrics [n, len(ks) * len(METRICS)] (column order of ``metric_names``).

    truth_keys: sorted int64 ``row * n_items + item`` of the truth entries of these rows.
    A listed item is a hit iff it is in the truth and its score is not -inf (not excluded).
    """
    dev = idx.device
    dtype = torch.float32 if dev.type == "mps" else torch.float64
    n, kmax = idx.shape
    if truth_keys.numel():
        q = idx + torch.arange(0, n * n_items, n_items, device=dev)[:, None]
        pos = torch.searchsorted(truth_keys, q).clamp_(max=truth_keys.numel() - 1)
        hits = ((truth_keys[pos] == q) & (vals > float("-inf"))).to(dtype)
    else:
        hits = torch.zeros(idx.shape, dtype=dtype, device=dev)
    disc = 1.0 / torch.log2(torch.arange(2, max(ks) + 2, device=dev, dtype=dtype))
    idcg_table = disc.cumsum(0)                      # IDCG@j = sum_{r<j} 1/log2(r+2)
    k_t = torch.tensor(ks, device=dev)
    c = (k_t.clamp(max=kmax) - 1)[None].expand(n, -1)
    nh = hits.cumsum(1).gather(1, c)                 # hits in the top K, [n, len(ks)]
    dcg = (hits * disc[:kmax]).cumsum(1).gather(1, c)
    nt = n_truth.clamp(min=1)[:, None]               # rows without truth: masked by callers
    idcg = idcg_table[torch.minimum(nt, k_t) - 1]    # min(|T|, K) ideal hits
    out = torch.stack([nh / nt, nh / k_t, dcg / idcg, (nh > 0).to(dtype)], dim=2)
    return out.reshape(n, len(ks) * len(METRICS))


def _rank_rows(scores, exclude_keys, truth_keys, n_truth, ks):
    """Per-row metrics of ``scores`` [n, m] (MODIFIED IN PLACE: excluded set to -inf).

    exclude_keys / truth_keys: int64 flat row-major indices ``row * m + item`` (truth sorted);
    n_truth: [n] |T| per row, excluded truth items included.
    """
    if not scores.is_floating_point() or not scores.is_contiguous():
        raise TypeError("scores must be a contiguous floating-point tensor")
    n, m = scores.shape
    kmax = min(max(ks), m)
    if exclude_keys.numel():
        scores.view(-1).index_fill_(0, exclude_keys, float("-inf"))
    vals, idx = _exact_order(*_candidates(scores, kmax), kmax, m,
                             lambda rows: scores.index_select(0, rows))
    return _row_metrics(vals, idx, truth_keys, n_truth, m, ks)


def _rank_sums(scores, exclude_rows, exclude_cols, truth_dense_bool, ks=KS):
    """Reusable block: sums of every metric over the rows of ``scores`` that have truth.

    ``scores`` [n, m] is modified in place; exclusion as COO index tensors, truth as a dense
    bool [n, m]. Returns ({metric_name: 0-d sum tensor}, n_users_counted 0-d tensor).
    """
    ks = _check_ks(ks)
    m = scores.shape[1]
    keys = exclude_rows.to(torch.int64) * m + exclude_cols.to(torch.int64)
    truth_keys = truth_dense_bool.reshape(-1).nonzero().squeeze(1)
    n_truth = truth_dense_bool.sum(1)
    per_row = _rank_rows(scores, keys, truth_keys, n_truth, ks)
    has = n_truth > 0
    sums = torch.where(has[:, None], per_row, torch.zeros_like(per_row)).sum(0)
    return dict(zip(metric_names(ks), sums.unbind(0))), has.sum()


def ranked_items(scores: torch.Tensor, exclude=None, k: int = max(KS)) -> torch.Tensor:
    """Top-k item ids per row [n, min(k, n_items)], ordered by (score desc, id asc), excluded
    items last (as -inf). ``scores`` is not modified."""
    n, m = scores.shape
    sub = scores.clone(memory_format=torch.contiguous_format)
    sub = sub if sub.is_floating_point() else sub.double()
    keys = _csr_flat_keys(_as_csr(exclude, n, m, "exclude"), scores.device)
    if keys.numel():
        sub.view(-1).index_fill_(0, keys, float("-inf"))
    kmax = min(int(k), m)
    return _exact_order(*_candidates(sub, kmax), kmax, m, lambda r: sub.index_select(0, r))[1]


def _nan_result(ks, prefix=""):
    return {name: float("nan") for name in metric_names(ks, prefix)}


def rank_metrics(scores: torch.Tensor, exclude, truth, ks=KS) -> dict[str, float]:
    """Metrics of a full score matrix [n_users, n_items] (see the module docstring).

    ``exclude`` / ``truth``: per-user lists of item ids, or scipy sparse [n_users, n_items]
    (``exclude`` may also be a list of sparse matrices, united, or None). ``scores`` is not
    modified. Returns ``{"recall@10": ..., "precision@10": ..., "ndcg@10": ..., "hit@10": ...}``.
    """
    ks = _check_ks(ks)
    n, m = scores.shape
    ex = _as_csr(exclude, n, m, "exclude")
    tr = _as_csr(truth, n, m, "truth")
    users = np.flatnonzero(np.diff(tr.indptr) > 0)
    if users.size == 0:
        return _nan_result(ks)
    dev = scores.device
    sub = scores.index_select(0, torch.as_tensor(users, device=dev))  # a copy we may modify
    if not sub.is_floating_point():
        sub = sub.double()
    tr_sub = tr[users]
    n_truth = torch.as_tensor(np.diff(tr_sub.indptr), device=dev)
    per_row = _rank_rows(sub, _csr_flat_keys(ex[users], dev), _csr_flat_keys(tr_sub, dev),
                         n_truth, ks)
    return dict(zip(metric_names(ks), per_row.mean(0).tolist()))


@torch.no_grad()
def evaluate(user_emb: torch.Tensor, item_emb: torch.Tensor, exclude, truth, ks=KS,
             chunk_size: int = 2048, prefix: str = "", per_user: bool = False):
    """Chunked full-ranking evaluation of scores ``user_emb @ item_emb.T`` on their device.

    Only users with truth are scored, ``chunk_size`` at a time; exclusion (one sparse matrix,
    a list of them such as [train, val] at test time, or per-user lists) and truth are moved
    to the device once as flat indices. Per chunk: matmul, ``index_fill_`` of -inf,
    ``topk(K+1)`` into a [n_eval, K+1] buffer (n_eval * (K+1) * 12 bytes). Then, once for all
    users: exact tie order (rows whose top-K cut falls in a tie are re-scored and stably
    sorted), truth lookup, metrics. Two host syncs in all (tied-row lookup, final means).
    Keys: ``f"{prefix}{name}@{k}"``.

    ``per_user=True`` returns ``(means, rows)`` instead of ``means``: ``rows`` maps ``"user"``
    to the evaluated user ids (int64 ``[n_eval]``, ascending; users with truth) and every key
    of ``means`` to that metric per user (float64 ``[n_eval]``). ``means`` is the mean of
    those rows (the same tensor reduction as without ``per_user``).
    """
    ks = _check_ks(ks)
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    n, m = user_emb.shape[0], item_emb.shape[0]
    dev = user_emb.device
    item_t = item_emb.to(dev).T
    ex = _as_csr(exclude, n, m, "exclude")
    tr = _as_csr(truth, n, m, "truth")
    users_np = np.flatnonzero(np.diff(tr.indptr) > 0)
    n_eval = users_np.size
    if n_eval == 0:
        empty = {"user": users_np.astype(np.int64), **{k: np.zeros(0) for k in metric_names(ks, prefix)}}
        return (_nan_result(ks, prefix), empty) if per_user else _nan_result(ks, prefix)
    ex_sub, tr_sub = ex[users_np], tr[users_np]
    users = torch.as_tensor(users_np, device=dev)
    first, contiguous = int(users_np[0]), int(users_np[-1]) - int(users_np[0]) + 1 == n_eval
    ex_keys, ex_ptr = _csr_flat_keys(ex_sub, dev), ex_sub.indptr
    kmax = min(max(ks), m)
    width = kmax + 1 if kmax < m else m
    sdtype = torch.promote_types(user_emb.dtype, item_emb.dtype)
    buf = (torch.empty(n_eval, width, dtype=sdtype, device=dev),
           torch.empty(n_eval, width, dtype=torch.int64, device=dev))
    for s in range(0, n_eval, chunk_size):
        e = min(s + chunk_size, n_eval)
        u = user_emb[first + s:first + e] if contiguous else user_emb.index_select(0, users[s:e])
        scores = u @ item_t
        scores.view(-1).index_fill_(0, ex_keys[ex_ptr[s]:ex_ptr[e]] - s * m, float("-inf"))
        _candidates(scores, kmax, out=(buf[0][s:e], buf[1][s:e]))

    def rescore(rows):  # the rare tied rows, re-scored with their exclusion
        scores = user_emb.index_select(0, users[rows]) @ item_t
        scores.view(-1).index_fill_(0, _csr_flat_keys(ex_sub[rows.cpu().numpy()], dev),
                                    float("-inf"))
        return scores

    vals, idx = _exact_order(buf[0], buf[1], kmax, m, rescore, chunk_size)  # host sync 1
    per_row = _row_metrics(vals, idx, _csr_flat_keys(tr_sub, dev),
                           torch.as_tensor(np.diff(tr_sub.indptr), device=dev), m, ks)
    means = dict(zip(metric_names(ks, prefix), per_row.mean(0).tolist()))  # host sync 2
    if not per_user:
        return means
    cols = per_row.to(torch.float64).cpu().numpy()
    return means, {"user": users_np.astype(np.int64), **{k: cols[:, j].copy() for j, k in enumerate(means)}}
