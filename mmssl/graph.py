"""Sparse graph operators on the device: the observed graph and the generated modality graphs.

Every operator is a torch sparse CSR matrix kept together with its transpose,
so that ``y = M @ x`` and its backward ``dx = M^T @ dy`` are both one CSR
product (no COO conversion, no dense user x item matrix anywhere).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


class _SpMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mat, mat_t):
        ctx.mat_t = mat_t
        return torch.sparse.mm(mat, x)

    @staticmethod
    def backward(ctx, grad):
        return torch.sparse.mm(ctx.mat_t, grad.contiguous()), None, None


class SparseOp:
    """A fixed sparse matrix M (rows x cols) with its transpose; ``op(x) = M @ x``, differentiable in x."""

    def __init__(self, mat: torch.Tensor, mat_t: torch.Tensor):
        self.mat, self.mat_t = mat, mat_t
        self.shape = tuple(mat.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.mat.dtype:
            x = x.to(self.mat.dtype)
        return _SpMM.apply(x, self.mat, self.mat_t)

    @classmethod
    def from_scipy(cls, m: sp.spmatrix, device: torch.device) -> "SparseOp":
        return cls(to_torch_csr(sp.csr_matrix(m), device), to_torch_csr(sp.csr_matrix(m.T), device))


def to_torch_csr(m: sp.csr_matrix, device) -> torch.Tensor:
    m.sort_indices()
    return torch.sparse_csr_tensor(
        torch.from_numpy(m.indptr.astype(np.int64)), torch.from_numpy(m.indices.astype(np.int64)),
        torch.from_numpy(m.data.astype(np.float32)), size=m.shape, device=device)


def _inv_sqrt(deg: np.ndarray) -> np.ndarray:
    out = np.zeros(deg.shape, dtype=np.float64)
    nz = deg > 0
    out[nz] = 1.0 / np.sqrt(deg[nz])
    return out


def observed_operators(train: sp.csr_matrix, device) -> tuple[SparseOp, SparseOp]:
    """The degree-normalised observed graph of eq. (2): ``(A_u, A_i)``.

    A_u = D_u^{-1/2} A (users x items) and A_i = D_i^{-1/2} A^T (items x users), so that
    f_u = A_u f̄ (Σ_{i∈N_u} f̄_i / sqrt|N_u|) and f_i = A_i f_u (Σ_{u∈N_i} f_u / sqrt|N_i|).
    The GNN of eq. (6) propagates with the same pair.
    """
    a = sp.csr_matrix(train, dtype=np.float64)
    a.data[:] = 1.0
    du, di = np.asarray(a.sum(1)).ravel(), np.asarray(a.sum(0)).ravel()
    a_u = sp.diags(_inv_sqrt(du)) @ a
    a_i = sp.diags(_inv_sqrt(di)) @ a.T.tocsr()
    return SparseOp.from_scipy(a_u, device), SparseOp.from_scipy(a_i, device)


def batch_pairs(train_t: torch.Tensor, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Observed pairs of a batch of users in a torch CSR matrix: (row in the batch [nnz], item [nnz]).

    Rows ascend (CSR order); ``users`` [B] int64. This is all the factored discriminator
    (mmssl.factored) needs of A[users, :].
    """
    crow, col = train_t.crow_indices(), train_t.col_indices()
    start, end = crow[users], crow[users + 1]
    counts = end - start
    row_ids = torch.repeat_interleave(torch.arange(len(users), device=users.device), counts)
    offsets = torch.arange(int(counts.sum()), device=users.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts)
    return row_ids, col[torch.repeat_interleave(start, counts) + offsets]


def batch_rows(train_t: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
    """Dense 0/1 rows A[users, :] of a torch CSR matrix, for a batch of users (B x |I|)."""
    row_ids, cols = batch_pairs(train_t, users)
    out = torch.zeros(len(users), train_t.shape[1], device=users.device)
    out[row_ids, cols] = 1.0
    return out


def topk_count(topk_rate: float, n_items: int) -> int:
    """k = max(1, round(rate * |I|)) neighbours per user in a generated graph."""
    return max(1, min(n_items, int(round(topk_rate * n_items))))


class GeneratedGraph(SparseOp):
    """A generated modality graph G^m (eq. 4 operators).

    Called, it is the user side: ``g(E_items)`` = e_u^m = Σ_{i∈N^m_u} e_i / sqrt|N^m_u| (U x d).
    ``g.item_side(E_users)`` = e_i^m = Σ_{u∈N^m_i} e_u / sqrt|N^m_i| (I x d).
    ``g.cols`` (U x k) are the neighbour columns it was built from (what a checkpoint stores).
    """

    def __init__(self, user_side: SparseOp, item_side: SparseOp, cols: torch.Tensor):
        super().__init__(user_side.mat, user_side.mat_t)
        self.item_side, self.cols = item_side, cols


# CPU: users per rebuild chunk so that the chunk's scores (|I| x chunk float32) stay in cache
REBUILD_CACHE_ELEMENTS = 1 << 20


@torch.no_grad()
def generator_graph(f_u: torch.Tensor, f_i: torch.Tensor, k: int, chunk: int = 2048,
                    select: str = "auto") -> GeneratedGraph:
    """Generated modality graph G^m of eq. (3) for EVERY user: top-k items of Â^m[u,:] = cos(f_u^m, f_i^m).

    ``f_u`` [|U|, d], ``f_i`` [|I|, d], ``k`` <= |I| neighbours per user. Chunked over users (never
    a dense |U| x |I| matrix). ``select``: ``"topk"`` scores ``chunk`` users at a time and
    calls ``torch.topk`` on each [chunk, |I|] block (the path before issue 6, kept on CUDA);
    ``"blocked"`` is :func:`blocked_topk_cols` (exact, CPU default) on chunks capped at
    ``REBUILD_CACHE_ELEMENTS`` scores so that they stay in cache; ``"auto"`` picks blocked on
    the CPU, topk elsewhere. Both keep the same k cosine values per user; which of several
    exactly tied items is kept is unspecified, as with ``torch.topk``. Timings: bench/README.md.
    Returns the normalised operators of eq. (4) (``D_u^{-1/2} G``: each user's k items,
    weights 1/sqrt(k); ``D_i^{-1/2} G^T``) with ``cols`` [|U|, k] ascending per user.
    Raises ValueError for an unknown ``select`` or k outside 1..|I|.
    """
    if select not in ("auto", "topk", "blocked"):
        raise ValueError(f"select must be auto, topk or blocked, not {select!r}")
    n_items = f_i.shape[0]
    if not 1 <= k <= n_items:
        raise ValueError(f"k must be in 1..|I| = 1..{n_items}, got {k}")
    fu, fi = F.normalize(f_u.float(), dim=1), F.normalize(f_i.float(), dim=1)
    blocked = select == "blocked" or (select == "auto" and fu.device.type == "cpu")
    if blocked:
        chunk = max(1, min(chunk, REBUILD_CACHE_ELEMENTS // max(1, n_items)))
        cols = blocked_topk_cols(fu, fi, k, chunk)
    else:
        cols = _topk_cols(fu, fi, k, chunk)
    return modality_id_operators(cols, n_items)


def _topk_cols(fu: torch.Tensor, fi: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Top-k columns of fu fiᵀ [|U|, k]: ``torch.topk`` over whole [chunk, |I|] score blocks."""
    fi_t = fi.T.contiguous()
    cols = torch.empty(fu.shape[0], k, dtype=torch.int64, device=fu.device)
    for s in range(0, fu.shape[0], chunk):
        cols[s:s + chunk] = torch.topk(fu[s:s + chunk] @ fi_t, k, dim=1).indices
    return cols


def block_size(n_items: int, k: int) -> int:
    """Items per block of :func:`blocked_topk_cols`: round(sqrt(|I| / k)) >= 1, which balances its two
    selections (|I|/b block maxima, then up to k·b candidates). It always leaves at least k
    blocks: b > 1 needs |I|/k >= 2.25 and then |I|/b >= |I|/(sqrt(|I|/k) + 1/2) >= k
    (tests/test_rebuild.py checks every |I| <= 400)."""
    return max(1, round(math.sqrt(n_items / max(1, k))))


def largest_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices [n, k] of the k largest entries of each row of ``x`` [n, m], in no particular order.

    CPU: ``numpy.argpartition`` (introselect; 3.7x faster than ``torch.topk(sorted=False)``
    for Baby's 148 x 705 block maxima, bench/README.md); other devices: ``torch.topk(sorted=False)``. Which of
    exactly tied entries is returned is unspecified.
    """
    n, m = x.shape
    if k == m:                                  # every column
        return torch.arange(m, device=x.device).expand(n, m).contiguous()
    if x.device.type == "cpu":
        part = np.argpartition(x.detach().contiguous().numpy(), m - k, axis=1)[:, m - k:]
        return torch.from_numpy(np.ascontiguousarray(part))
    return torch.topk(x, k, dim=1, sorted=False).indices


def blocked_topk_cols(fu: torch.Tensor, fi: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Exact top-k columns of fu fiᵀ per row, [|U|, k] int64, in any order; ``fu`` [|U|, d], ``fi`` [|I|, d].

    The items are cut into blocks of b (:func:`block_size`). Per user: the block maxima
    (one vectorised max over the [|I|, chunk] scores), the k blocks with the largest maxima
    (:func:`largest_k` over |I|/b values), and t = the smallest of those k maxima. Every item
    scoring above t lies in one of these blocks, and they hold at least k items scoring ≥ t,
    so the k largest scores are the k largest among their items that score ≥ t; those
    (k to k·b per user) are packed and :func:`largest_k` picks them. Same k values as one
    ``torch.topk`` over the whole row (tests/test_rebuild.py) for about |I|/b + k·b
    comparisons per user instead of a partial sort of |I| (about 2x faster on TikTok and
    Baby, bench/README.md). ``chunk``: users per score block [|I|, chunk]. Users with NaN
    scores fall back to ``torch.topk`` over their whole row. Raises nothing beyond torch's
    shape errors.
    """
    n_users, n_items = fu.shape[0], fi.shape[0]
    b = block_size(n_items, k)
    if b == 1:                                                        # no blocking possible
        return _topk_cols(fu, fi, k, chunk)
    nb = -(-n_items // b)
    fi_pad = torch.zeros(nb * b, fi.shape[1], dtype=fi.dtype, device=fi.device)
    fi_pad[:n_items] = fi
    cols = torch.empty(n_users, k, dtype=torch.int64, device=fu.device)
    arange_kb = torch.arange(k * b, device=fu.device)
    for s in range(0, n_users, chunk):
        users = fu[s:s + chunk]
        c = users.shape[0]
        scores_t = fi_pad @ users.T                                   # [nb·b, c]: a block is b contiguous rows
        scores_t[n_items:] = -math.inf
        blocks = scores_t.view(nb, b, c)
        block_max = blocks.amax(1).T.contiguous()                      # [c, nb]
        top = largest_k(block_max, k)                                  # [c, k] blocks
        t = torch.gather(block_max, 1, top).amin(1, keepdim=True)      # the k-th largest block maximum
        cand = blocks[top, :, torch.arange(c, device=fu.device)[:, None]].reshape(c, k * b)
        keep = cand >= t                                               # score ≥ t: k to k·b per user
        count = keep.sum(1)
        short = count < k                                              # only rows with NaN scores
        if bool(short.any()):
            keep[short] = False
            count = count.masked_fill(short, k)
        width = int(count.max())
        pos = torch.where(keep, keep.cumsum(1) - 1, width)
        packed = torch.full((c, width + 1), -math.inf, dtype=cand.dtype, device=fu.device).scatter_(1, pos, cand)
        where = torch.zeros(c, width + 1, dtype=torch.int64, device=fu.device).scatter_(
            1, pos, arange_kb.expand(c, -1))
        j = torch.gather(where, 1, largest_k(packed[:, :width], k))
        cols[s:s + c] = torch.gather(top, 1, j // b) * b + j % b
        if bool(short.any()):                                          # those rows: torch.topk over the whole row
            rows = torch.nonzero(short).squeeze(1)
            cols[s + rows] = _topk_cols(users[rows], fi, k, len(rows))
    return cols


def sorted_pattern(cols: torch.Tensor, n_items: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both sides of the pattern of ``cols`` [|U|, k] (distinct items per row): ``(user_cols, item_crow, item_users)``.

    ``user_cols`` [|U|·k]: each user's items ascending (row-major); ``item_crow`` [|I|+1] and
    ``item_users`` [|U|·k]: the item-major CSR, users ascending. CPU: scipy's two CSR/CSC
    conversions (counting sorts, O(|U|·k)); other devices: two stable torch sorts.
    """
    n_users, k = cols.shape
    if cols.device.type != "cpu":
        return _sorted_pattern_torch(cols, n_items)
    m = sp.csr_matrix((np.ones(n_users * k, dtype=np.float32), cols.reshape(-1).numpy(),
                       np.arange(0, n_users * k + 1, k)), shape=(n_users, n_items))
    by_item = m.tocsc()
    by_user = by_item.tocsr()
    return tuple(torch.from_numpy(a.astype(np.int64)) for a in (by_user.indices, by_item.indptr, by_item.indices))


def _sorted_pattern_torch(cols: torch.Tensor, n_items: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sorted_pattern` with two stable torch sorts (any device)."""
    k = cols.shape[1]
    items, order = torch.sort(cols.reshape(-1), stable=True)           # item-major, users ascending
    users = torch.div(order, k, rounding_mode="floor")
    crow = torch.zeros(n_items + 1, dtype=torch.int64, device=cols.device)
    crow[1:] = torch.cumsum(torch.bincount(items, minlength=n_items), 0)
    return items[torch.sort(users, stable=True).indices], crow, users


def modality_id_operators(cols: torch.Tensor, n_items: int) -> GeneratedGraph:
    """The :class:`GeneratedGraph` of eq. (4) from the k neighbour columns per user (``cols``: [|U|, k] int64).

    The graph keeps ``cols`` ascending per user (see :func:`sorted_pattern`).
    """
    n_users, k = cols.shape
    device = cols.device
    sorted_flat, t_crow, t_cols = sorted_pattern(cols, n_items)
    counts = t_crow[1:] - t_crow[:-1]
    t_rows = torch.repeat_interleave(torch.arange(n_items, device=device), counts)
    crow = torch.arange(0, n_users * k + 1, k, device=device)
    ones = torch.full((n_users * k,), 1.0 / math.sqrt(k), device=device)
    g_u = torch.sparse_csr_tensor(crow, sorted_flat, ones, size=(n_users, n_items))
    # item side: normalised by item in-degree
    inv_sqrt_deg_i = counts.float().clamp(min=1).rsqrt()
    g_i = torch.sparse_csr_tensor(t_crow, t_cols, inv_sqrt_deg_i[t_rows], size=(n_items, n_users))
    # transposes for the backward passes
    g_u_t = torch.sparse_csr_tensor(t_crow, t_cols, ones, size=(n_items, n_users))
    g_i_t = torch.sparse_csr_tensor(crow, sorted_flat, inv_sqrt_deg_i[sorted_flat], size=(n_users, n_items))
    return GeneratedGraph(SparseOp(g_u, g_u_t), SparseOp(g_i, g_i_t), sorted_flat.view(n_users, k))
