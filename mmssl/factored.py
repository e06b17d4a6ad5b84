"""The exact factored discriminator input: fake, real and interpolated rows without forming them.

Every row the discriminator sees is "sparse + low rank" (design doc, "Efficiency: the
exact factored discriminator"), so its first layer z = W_1 x + b_1 (|I| -> |I|/4) is
computed from d-wide factors and a few sparse entries, never from a B x |I| row:

- fake row (modality m): x_u = (f̂_u F̂ᵀ − Σ_{i∈N_u} s_ui e_i) / n_u, s_ui = f̂_u·f̂_i, so
  W_1 x_u = (f̂_u (F̂ᵀ W_1ᵀ) − Σ_{i∈N_u} s_ui W_1[:, i]) / n_u and
  n_u² = f̂_u (F̂ᵀF̂) f̂_uᵀ − Σ_{i∈N_u} s_ui²  (f̂ = row-normalised views, eq. 3);
- real row: softmax_i((A_ui + g_ui)/τ) is exactly sparse in floating point at small τ
  (every other entry underflows to 0.0) and is kept as sparse entries; at large τ
  (more than ``DENSE_FRACTION`` of the entries non-zero) that part falls back to a
  dense block. The ζ·cos(h_u, h_i) part is rank d with observed items removed, like
  a fake row. ``gumbel=False`` / ``augment=False`` drop the respective part;
- interpolated rows (WGAN-GP) x = α real + (1 − α) fake have W_1 x + b_1 =
  α z_real + (1 − α) z_fake exactly (the first layer is affine), so they are never
  formed either. The penalty's ||∇_x D(x)|| = ||g W_1|| (g = ∂D/∂z) keeps one dense
  product: through the Gram matrix W_1 W_1ᵀ (|I|/4 x |I|/4, one product forward and one,
  symmetric, backward) or directly g W_1, whichever has fewer flops.

The Gumbel noise is drawn in chunks of users (never the whole B x |I| at once). On the CPU
consecutive ``rand`` calls give exactly the numbers of the dense path's single ``rand`` of
B x |I|, so both paths give the same numbers for the same random state
(tests/test_factored.py); on CUDA the chunked draws are different numbers of the same
i.i.d. U(0,1) distribution. Dropout masks and α are drawn in the dense path's order.

Source: the equations of shared/design/mmssl.md ("Adversarial part"; WGAN-GP as in
Gulrajani et al. 2017), re-computed exactly. Shapes are given per function; nothing here
raises beyond torch's own shape/dtype errors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mmssl.graph import batch_pairs  # noqa: F401  (re-exported: the pairs every factored row uses)

# the Gumbel-softmax part falls back to one dense block above this share of non-zero entries
DENSE_FRACTION = 1.0 / 16
# elements per chunk of users when drawing the Gumbel noise (chunk x |I| stays small; at most half a batch)
NOISE_CHUNK_ELEMENTS = 1 << 20


@dataclass
class FactoredRows:
    """n rows of width |I|, never formed: row_b = inv_norm_b · (Σ_t w_t L_t[b] R_tᵀ + S[b] + Dense[b]).

    ``lowrank``: terms (L_t [n, d], R_t [|I|, d], weight w_t); ``rows, cols, vals``: the sparse
    part S as COO entries (duplicates add up); ``dense``: an optional [n, |I|] block (only
    the large-τ fallback of the real rows); ``inv_norm``: [n], 1 / max(||row||_2, 1e-12).
    """
    n: int
    n_items: int
    lowrank: list[tuple[torch.Tensor, torch.Tensor, float]]
    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    inv_norm: torch.Tensor
    dense: torch.Tensor | None = field(default=None)

    def detach(self) -> "FactoredRows":
        return FactoredRows(self.n, self.n_items, [(a.detach(), b.detach(), w) for a, b, w in self.lowrank],
                            self.rows, self.cols, self.vals.detach(), self.inv_norm.detach(),
                            None if self.dense is None else self.dense.detach())

    def first_layer(self, weight_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """z = rows W_1ᵀ + b_1 [n, |I|/4]; ``weight_t`` = W_1ᵀ [|I|, |I|/4] contiguous, b_1 = ``bias``.

        Costs d·|I|·|I|/4 per low-rank term and nnz·|I|/4 for the sparse part (one CSR
        product), instead of n·|I|·|I|/4.
        """
        z = _SparseRowsMm.apply(self.vals, weight_t, self.rows, self.cols, self.n)
        for left, right, w in self.lowrank:
            z = z + w * (left @ (right.T @ weight_t))              # [n,d] @ ([d,|I|] @ [|I|,h1])
        if self.dense is not None:
            z = z + self.dense @ weight_t
        return z * self.inv_norm[:, None] + bias

    def materialise(self) -> torch.Tensor:
        """The dense [n, |I|] rows (for tests and checks only; the training path never calls it)."""
        x = sum(w * (left @ right.T) for left, right, w in self.lowrank) if self.lowrank else 0.0
        x = torch.zeros(self.n, self.n_items, dtype=self.inv_norm.dtype, device=self.inv_norm.device) + x
        x = x.index_put((self.rows, self.cols), self.vals, accumulate=True)
        if self.dense is not None:
            x = x + self.dense
        return x * self.inv_norm[:, None]


def first_layer_rows(blocks: list[FactoredRows], weight_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """z = rows W_1ᵀ + b_1 for several blocks of factored rows at once, stacked: [Σ n, |I|/4].

    Same values as ``torch.cat([b.first_layer(weight_t, bias) for b in blocks])``, but all
    low-rank right factors go through ONE product with W_1ᵀ (one |I| x |I|/4 gradient in the
    backward instead of one per term) and all sparse parts through one CSR product.
    """
    h1 = weight_t.shape[1]
    terms = [(k, left, right, w) for k, b in enumerate(blocks) for left, right, w in b.lowrank]
    offsets = [0]
    for b in blocks:
        offsets.append(offsets[-1] + b.n)
    rows = torch.cat([b.rows + offsets[k] for k, b in enumerate(blocks)])
    cols = torch.cat([b.cols for b in blocks])
    vals = torch.cat([b.vals for b in blocks])
    z = _SparseRowsMm.apply(vals, weight_t, rows, cols, offsets[-1])
    low = [weight_t.new_zeros(b.n, h1) for b in blocks]
    if terms:
        p_all = torch.cat([right for _, _, right, _ in terms], dim=1).T @ weight_t      # [T·d, h1]
        at = 0
        for k, left, _, w in terms:
            low[k] = low[k] + w * (left @ p_all[at:at + left.shape[1]])
            at += left.shape[1]
    for k, b in enumerate(blocks):
        if b.dense is not None:                                          # large-τ fallback only
            low[k] = low[k] + b.dense @ weight_t
    z = z + torch.cat(low)
    return z * torch.cat([b.inv_norm for b in blocks])[:, None] + bias


class _SparseRowsMm(torch.autograd.Function):
    """out [n, h1] = S Wᵀ for S = COO(rows, cols, vals) [n, |I|] (duplicates add), Wᵀ [|I|, h1].

    Forward and the W gradient are CSR products (Sᵀ dOut); the values' gradient is the
    sampled product dOut Wᵀ at the nnz entries (:func:`_sampled_rows_dot`), computed only
    when they need it (the G step).
    """

    @staticmethod
    def forward(ctx, vals, weight_t, rows, cols, n):
        ctx.save_for_backward(vals, weight_t, rows, cols)
        ctx.n = n
        if not len(vals):
            return weight_t.new_zeros(n, weight_t.shape[1])
        s = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, weight_t.shape[0])).to_sparse_csr()
        return torch.sparse.mm(s, weight_t)

    @staticmethod
    def backward(ctx, grad):
        vals, weight_t, rows, cols = ctx.saved_tensors
        d_vals = d_w = None
        if not len(vals):
            return (torch.zeros_like(vals) if ctx.needs_input_grad[0] else None,
                    torch.zeros_like(weight_t) if ctx.needs_input_grad[1] else None, None, None, None)
        grad = grad.contiguous()
        if ctx.needs_input_grad[0]:
            d_vals = _sampled_rows_dot(grad, weight_t, rows, cols, ctx.n)
        if ctx.needs_input_grad[1]:
            st = torch.sparse_coo_tensor(torch.stack([cols, rows]), vals, (weight_t.shape[0], ctx.n)).to_sparse_csr()
            d_w = torch.sparse.mm(st, grad)
        return d_vals, d_w, None, None, None


def _sampled_rows_dot(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n: int) -> torch.Tensor:
    """[nnz] a[rows[e]] · b[cols[e]] for ``a`` [n, h], ``b`` [|I|, h]: one SDDMM (``torch.sparse.sampled_addmm``).

    Entries keep their order, duplicates included (``rows`` need not ascend: a stable sort
    puts them in CSR order and back). Same values as ``(a[rows] * b[cols]).sum(1)`` up to the
    summation order, without its two [nnz, h] gathered copies (~20x faster on TikTok's G step).
    """
    order = torch.argsort(rows, stable=True)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    pattern = torch.sparse_csr_tensor(crow, cols[order], torch.ones(len(rows), dtype=a.dtype, device=a.device),
                                      (n, b.shape[0]))
    try:
        got = torch.sparse.sampled_addmm(pattern, a, b.T, beta=0.0).values()
    except (RuntimeError, NotImplementedError):  # a device or dtype without SDDMM (only the CPU is measured)
        return (a.index_select(0, rows) * b.index_select(0, cols)).sum(1)
    return torch.empty_like(got).scatter_(0, order, got)


def _inv_norm(sq: torch.Tensor) -> torch.Tensor:
    """1 / max(sqrt(sq), 1e-12), as F.normalize (sq clamped so that the gradient stays finite)."""
    return sq.clamp_min(1e-24).rsqrt()


def _masked_lowrank(left: torch.Tensor, right: torch.Tensor, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries s_ui = left_u · right_i on the observed pairs, and ||left_u Rᵀ (1 − a_u)||² per row."""
    rows, cols = pairs
    s_obs = (left[rows] * right[cols]).sum(1)
    gram = right.T @ right                                          # [d, d]
    sq = ((left @ gram) * left).sum(1) - torch.zeros_like(left[:, 0]).index_add(0, rows, s_obs * s_obs)
    return s_obs, sq


def factored_fake_rows(f_user_b: torch.Tensor, f_item: torch.Tensor, pairs) -> FactoredRows:
    """Fake rows Â^m[u, :] = cos(f_u^m, f_i^m), observed items zeroed, L2-normalised — factored.

    ``f_user_b`` [B, d], ``f_item`` [|I|, d], ``pairs`` from :func:`mmssl.graph.batch_pairs`. Equal to
    ``mmssl.losses.fake_rows`` (materialised); gradients flow into both views.
    """
    fu, fi = F.normalize(f_user_b, dim=1), F.normalize(f_item, dim=1)
    s_obs, sq = _masked_lowrank(fu, fi, pairs)
    return FactoredRows(len(fu), len(fi), [(fu, fi, 1.0)], pairs[0], pairs[1], -s_obs, _inv_norm(sq))


def _gumbel_entries(pairs, n: int, n_items: int, tau: float, dtype, device):
    """Non-zero entries of softmax_i((A_ui + g_ui)/τ), drawn in chunks of users (same draws as one rand)."""
    rows, cols = pairs
    chunk = max(1, min(NOISE_CHUNK_ELEMENTS // max(1, n_items), (n + 1) // 2))   # never the whole batch at once
    out_r, out_c, out_v, out_obs = [], [], [], []
    bounds = torch.searchsorted(rows, torch.arange(0, n + chunk, chunk, device=device).clamp(max=n))
    for j, s in enumerate(range(0, n, chunk)):
        e = min(n, s + chunk)
        lo, hi = int(bounds[j]), int(bounds[j + 1])
        obs = torch.zeros(e - s, n_items, dtype=dtype, device=device)
        obs[rows[lo:hi] - s, cols[lo:hi]] = 1.0
        u = torch.rand(e - s, n_items, dtype=dtype, device=device).clamp_(1e-10, 1.0 - 1e-7)
        sm = torch.softmax((obs - torch.log(-torch.log(u))) / tau, dim=1)
        r, c = torch.nonzero(sm, as_tuple=True)
        out_r.append(r + s)
        out_c.append(c)
        out_v.append(sm[r, c])
        out_obs.append(obs[r, c])
    return torch.cat(out_r), torch.cat(out_c), torch.cat(out_v), torch.cat(out_obs)


def factored_real_rows(pairs, n: int, h_user_b: torch.Tensor, h_item: torch.Tensor, tau: float, zeta: float,
                       gumbel: bool = True, augment: bool = True) -> FactoredRows:
    """Real rows Ã[u, :] = softmax_i((A_ui + g_ui)/τ) + ζ·cos(h_u, h_i)(1 − A_ui), L2-normalised — factored.

    ``pairs`` from :func:`mmssl.graph.batch_pairs` for the n = B batch users; ``h_user_b`` [B, d] and
    ``h_item`` [|I|, d] are detached here. Same random draws and values as
    ``mmssl.losses.gumbel_real_rows``; the softmax part is sparse, or one dense block above
    ``DENSE_FRACTION`` non-zeros (large τ).
    """
    n_items, dtype, device = h_item.shape[0], h_item.dtype, h_item.device
    if gumbel:
        r, c, v, obs_v = _gumbel_entries(pairs, n, n_items, tau, dtype, device)
    else:
        r, c = pairs
        v = obs_v = torch.ones(len(r), dtype=dtype, device=device)
    sq = torch.zeros(n, dtype=dtype, device=device).index_add(0, r, v * v)
    lowrank: list = []
    rows, cols, vals = r, c, v
    if augment:
        hu, hi = F.normalize(h_user_b.detach(), dim=1), F.normalize(h_item.detach(), dim=1)
        cos_obs, sq_cos = _masked_lowrank(hu, hi, pairs)
        cross = v * (hu[r] * hi[c]).sum(1) * (1.0 - obs_v)          # Σ_i sm_ui cos_ui (1 − A_ui)
        sq = sq + 2.0 * zeta * torch.zeros_like(sq).index_add(0, r, cross) + zeta * zeta * sq_cos
        lowrank = [(hu, hi, zeta)]
        rows, cols, vals = torch.cat([r, pairs[0]]), torch.cat([c, pairs[1]]), torch.cat([v, -zeta * cos_obs])
    dense = None
    if gumbel and len(r) > DENSE_FRACTION * n * n_items:                # large τ: the softmax part is dense
        dense = torch.zeros(n, n_items, dtype=dtype, device=device).index_put_((r, c), v)
        keep = len(r)
        rows, cols, vals = rows[keep:], cols[keep:], vals[keep:]
    return FactoredRows(n, n_items, lowrank, rows, cols, vals, _inv_norm(sq), dense)


GRAM_BLOCK = 256   # columns per block of the symmetric products (only blocks j <= i are computed; measured best)


def symmetric_product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """xᵀ y [h, h] for x, y [m, h] whose product is KNOWN to be symmetric: only the blocks on and
    below the diagonal are multiplied (about half the flops of ``x.T @ y``), the rest mirrored."""
    h = x.shape[1]
    if h <= GRAM_BLOCK:
        return x.T @ y
    out = x.new_empty(h, h)
    edges = list(range(0, h, GRAM_BLOCK)) + [h]
    for i in range(len(edges) - 1):
        xi = x[:, edges[i]:edges[i + 1]].T
        for j in range(i + 1):
            blk = xi @ y[:, edges[j]:edges[j + 1]]
            out[edges[i]:edges[i + 1], edges[j]:edges[j + 1]] = blk
            if j < i:
                out[edges[j]:edges[j + 1], edges[i]:edges[i + 1]] = blk.T
    return out


def gram(w: torch.Tensor) -> torch.Tensor:
    """G = W Wᵀ [h, h] for W [h, |I|], from the blocks on and below the diagonal only."""
    return symmetric_product(w.T, w.T)


class _GramQuadratic(torch.autograd.Function):
    """q_b = g_b (W Wᵀ) g_bᵀ = ||g_b W||² per row, through the Gram matrix, with a symmetric backward.

    Forward: G = W Wᵀ (half the blocks), Y = g G. Backward: dg = 2 dq ⊙ Y (no product),
    dW = 2 C W with C = gᵀ diag(dq) g (symmetric: half the blocks) and one |I|/4 x |I|/4 x |I| product.
    """

    @staticmethod
    def forward(ctx, g, w):
        y = g @ gram(w)
        ctx.save_for_backward(g, w, y)
        return (y * g).sum(1)

    @staticmethod
    def backward(ctx, dq):
        g, w, y = ctx.saved_tensors
        d_g = 2.0 * dq[:, None] * y if ctx.needs_input_grad[0] else None
        d_w = 2.0 * (symmetric_product(g * dq[:, None], g) @ w) if ctx.needs_input_grad[1] else None
        return d_g, d_w


def use_gram(n_rows: int, weight: torch.Tensor) -> bool:
    """Gram route when its flops (~1.6 h1² |I|) are below the direct route's (3 n h1 |I|)."""
    return 1.6 * weight.shape[0] <= 3 * n_rows


def input_grad_norm(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """||∇_x D(x)||_2 per row = ||g W_1||_2 for g = ∂D/∂z [n, h1], W_1 = ``weight`` [h1, |I|]."""
    if use_gram(g.shape[0], weight):
        return _GramQuadratic.apply(g, weight).clamp_min(1e-30).sqrt()
    return (g @ weight).norm(2, dim=1)


def factored_gradient_penalty(critic, z_real: torch.Tensor, z_fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP mean((||∇_x D(x)||_2 − 1)²) from first-layer outputs: z_x = α z_real + (1 − α) z_fake.

    ``z_real``, ``z_fake`` [n, |I|/4] are W_1 x + b_1 of the real (repeated) and fake rows;
    α ~ U(0,1) per row is drawn exactly as in ``mmssl.losses.gradient_penalty``.
    """
    alpha = torch.rand(z_real.shape[0], 1, device=z_real.device, dtype=z_real.dtype)
    z_x = alpha * z_real + (1.0 - alpha) * z_fake
    out = critic.head(z_x)
    (g,) = torch.autograd.grad(out.sum(), z_x, create_graph=True)
    return (input_grad_norm(g, critic.lin1.weight) - 1.0).pow(2).mean()


def factored_discriminator_loss(critic, real: FactoredRows, fakes: list[FactoredRows],
                                gp_weight: float) -> torch.Tensor:
    """L_D = mean D(fake) − mean D(real) + λ1 · GP, on factored rows (``fakes``: one per modality).

    Same value as ``mmssl.losses.discriminator_loss`` on the materialised rows.
    """
    w, b = critic.lin1.weight.T.contiguous(), critic.lin1.bias
    z = first_layer_rows([*fakes, real], w, b)
    n_fake = sum(f.n for f in fakes)
    z_fake, z_real = z[:n_fake], z[n_fake:]
    loss = critic.head(z_fake).mean() - critic.head(z_real).mean()
    if gp_weight > 0:
        loss = loss + gp_weight * factored_gradient_penalty(critic, z_real.repeat(len(fakes), 1), z_fake)
    return loss


def factored_generator_loss(critic, fakes: list[FactoredRows]) -> torch.Tensor:
    """L_G = −mean D(fake) on factored rows; gradients reach the views through d-wide products."""
    w, b = critic.lin1.weight.T.contiguous(), critic.lin1.bias
    return -critic.head(first_layer_rows(fakes, w, b)).mean()
