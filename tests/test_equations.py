"""Value tests of every MMSSL equation against independent references written from the paper.

Each reference below is a plain loop or dense numpy (float64) on a tiny hand-made input,
written from the formula in ``shared/design/mmssl.md`` without calling the function under
test; results must agree to 1e-6. Randomness (dropout, Gumbel noise, the WGAN-GP α) is
fixed by a seed and the reference redraws the same numbers (``torch.manual_seed`` + the
same draw call), or enters through the function's arguments.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn as nn

import mmssl.step
from mmssl.config import Config
from mmssl.graph import generator_graph, modality_id_operators, observed_operators
from mmssl.losses import (bpr_loss, discriminator_loss, fake_rows, generator_loss, gradient_penalty,
                          gumbel_real_rows, info_nce, l2_penalty)
from mmssl.model import (MMSSL, Discriminator, InterModalAttention, Views, fusion, gnn, modality_id_views,
                         modality_projection, modality_views)
from mmssl.step import train_step
from mmssl.train import Run

TOL = 1e-6
# 4 users x 5 items; user 3 has no items, item 4 has no users
A = np.array([[1, 1, 0, 0, 0],
              [0, 1, 1, 0, 0],
              [1, 0, 1, 1, 0],
              [0, 0, 0, 0, 0]], dtype=np.float64)


def close(got, want, tol=TOL):
    got = got.detach().double().numpy() if isinstance(got, torch.Tensor) else np.asarray(got, dtype=np.float64)
    np.testing.assert_allclose(got, np.asarray(want, dtype=np.float64), rtol=0, atol=tol)


def t32(x):
    return torch.tensor(np.asarray(x), dtype=torch.float32)


def rnd(seed, *shape, scale=1.0):
    return np.random.default_rng(seed).normal(size=shape) * scale


def ops(a=A):
    return observed_operators(sp.csr_matrix(a), torch.device("cpu"))


def neighbours(a):
    """N_u (items of each user) and N_i (users of each item) of a 0/1 matrix."""
    return ([np.flatnonzero(r).tolist() for r in a], [np.flatnonzero(c).tolist() for c in a.T])


# ------------------------------------------------------------------ references (paper formulas)
def ref_views(a, f_bar):
    """Eq. 2: f_u = Σ_{i∈N_u} f̄_i / sqrt|N_u|; f_i = Σ_{u∈N_i} f_u / sqrt|N_i| (0 for empty sets)."""
    n_u, n_i = neighbours(a)
    f_u = np.zeros((a.shape[0], f_bar.shape[1]))
    for u, items in enumerate(n_u):
        for i in items:
            f_u[u] += f_bar[i] / math.sqrt(len(items))
    f_i = np.zeros((a.shape[1], f_bar.shape[1]))
    for i, users in enumerate(n_i):
        for u in users:
            f_i[i] += f_u[u] / math.sqrt(len(users))
    return f_u, f_i


def ref_cos(x, y):
    return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def ref_id_views(neigh_u, e_user, e_item):
    """Eq. 4 on G^m given each user's neighbour set N^m_u."""
    e_u = np.zeros_like(e_user)
    for u, items in enumerate(neigh_u):
        for i in items:
            e_u[u] += e_item[i] / math.sqrt(len(items))
    users_of = [[u for u, items in enumerate(neigh_u) if i in items] for i in range(len(e_item))]
    e_i = np.zeros_like(e_item)
    for i, users in enumerate(users_of):
        for u in users:
            e_i[i] += e_user[u] / math.sqrt(len(users))
    return e_u, e_i


def ref_attention(views, w_q, w_k, heads):
    """Eq. 5: per node, head h, query modality m: w = softmax over KEY modalities m' of
    (e^m W_h^Q)·(e^{m'} W_h^K)/sqrt(d/H); ē^m = mean_h Σ_{m'} w e^{m'}; Ē = mean_m ē^m."""
    n, d = views[0].shape
    M, dh = len(views), d // heads
    out = np.zeros((n, d))
    for node in range(n):
        e_bar = np.zeros((M, d))
        for h in range(heads):
            cols = slice(h * dh, (h + 1) * dh)
            for m in range(M):
                q = views[m][node] @ w_q[:, cols]
                logits = np.array([q @ (views[mp][node] @ w_k[:, cols]) / math.sqrt(dh) for mp in range(M)])
                w = np.exp(logits - logits.max())
                w /= w.sum()
                e_bar[m] += sum(w[mp] * views[mp][node] for mp in range(M)) / heads
        out[node] = e_bar.mean(0)
    return out


def ref_gnn(a, e_u0, e_i0, n_layers):
    """Eq. 6: E_u^{l+1} = D_u^{-1/2} A E_i^l, E_i^{l+1} = D_i^{-1/2} A^T E_u^l; mean of layers 0..L."""
    du, di = a.sum(1), a.sum(0)
    a_u = np.divide(a, np.sqrt(du)[:, None], out=np.zeros_like(a), where=du[:, None] > 0)
    a_i = np.divide(a.T, np.sqrt(di)[:, None], out=np.zeros_like(a.T), where=di[:, None] > 0)
    us, its = [e_u0], [e_i0]
    for _ in range(n_layers):
        us, its = us + [a_u @ its[-1]], its + [a_i @ us[-1]]
    return np.mean(us, axis=0), np.mean(its, axis=0)


def ref_fusion(e_hat, views, omega):
    """Eq. 7: h = ê + ω Σ_m f^m / ||f^m||_2 row-wise."""
    return e_hat + omega * sum(v / np.linalg.norm(v, axis=1, keepdims=True) for v in views)


def ref_info_nce(h, e, tau):
    """InfoNCE, anchor h_u: positive e_u; negatives e_{u'} and h_{u'} (u' ≠ u); sim cos/τ'."""
    losses = []
    for u in range(len(h)):
        pos = ref_cos(h[u], e[u]) / tau
        negs = [ref_cos(h[u], e[v]) / tau for v in range(len(h)) if v != u]
        negs += [ref_cos(h[u], h[v]) / tau for v in range(len(h)) if v != u]
        losses.append(-pos + math.log(math.exp(pos) + sum(math.exp(s) for s in negs)))
    return float(np.mean(losses))


def leaky(x, slope=0.2):
    return np.where(x > 0, x, slope * x)


def ref_discriminator(d: Discriminator, x, train_masks=None):
    """D(a) = sigmoid(Linear(Γ(Γ(a)))), Γ(a) = Dropout(BN(LeakyReLU_0.2(Linear(a)))).

    Eval mode: BN with running stats, dropout identity. ``train_masks`` = (m1, m2, p1, p2):
    BN with the batch's mean and biased variance, dropout mask / (1 - p)."""
    p = {k: v.detach().double().numpy() for k, v in d.state_dict().items() if v.is_floating_point()}
    lin = [("lin1.weight", "lin1.bias"), ("gamma2.0.weight", "gamma2.0.bias")]
    bns = ["rest1.1", "gamma2.2"]
    a = np.asarray(x, dtype=np.float64)
    for layer in range(2):
        z = leaky(a @ p[lin[layer][0]].T + p[lin[layer][1]])
        if train_masks is None:
            mean, var = p[f"{bns[layer]}.running_mean"], p[f"{bns[layer]}.running_var"]
        else:
            mean, var = z.mean(0), z.var(0)
        z = (z - mean) / np.sqrt(var + 1e-5) * p[f"{bns[layer]}.weight"] + p[f"{bns[layer]}.bias"]
        if train_masks is not None:
            z = z * train_masks[layer] / (1 - train_masks[2 + layer])
        a = z
    return 1.0 / (1.0 + np.exp(-(a @ p["out.weight"].T + p["out.bias"])[:, 0]))


def tanh_critic(w):
    """A toy non-linear critic D(x) = Σ_j tanh((x W)_j), its numpy gradient ∇_x D = W (1 - tanh²)."""
    wt = torch.tensor(w)
    critic = lambda x: torch.tanh(x @ wt.to(x.dtype)).sum(1)  # noqa: E731
    grad = lambda x: (w @ (1 - np.tanh(x @ w) ** 2).T).T      # noqa: E731
    value = lambda x: np.tanh(x @ w).sum(1)                    # noqa: E731
    return critic, value, grad


# ------------------------------------------------------------------ eq. 1-2
def test_modality_projection_is_dropout_of_the_affine_map():
    """Eq. 1: f̄ = Dropout(W x + b); the dropout mask acts on the d outputs (after the linear map)."""
    x = rnd(0, 5, 3)
    proj = nn.Linear(3, 4).double()
    w, b = proj.weight.detach().numpy(), proj.bias.detach().numpy()
    affine = np.array([[sum(w[j, k] * x[i, k] for k in range(3)) + b[j] for j in range(4)] for i in range(5)])
    close(modality_projection(torch.tensor(x), proj, nn.Dropout(0.3).eval()), affine)
    mask = (rnd(1, 5, 4) > 0).astype(float)
    close(modality_projection(torch.tensor(x), proj, lambda t: t * torch.tensor(mask) / 0.7), affine * mask / 0.7)
    torch.manual_seed(5)
    got = modality_projection(torch.tensor(x), proj, nn.Dropout(0.3).train())
    torch.manual_seed(5)
    drawn = torch.empty(5, 4, dtype=torch.float64).bernoulli_(0.7).numpy()
    close(got, affine * drawn / 0.7)


def test_modality_views_are_degree_normalised_sums():
    """Eq. 2 on the observed graph, with an isolated user and an item without users."""
    f_bar = rnd(2, 5, 3)
    a_u, a_i = ops()
    f_u, f_i = modality_views(t32(f_bar), a_u, a_i)
    want_u, want_i = ref_views(A, f_bar)
    close(f_u, want_u)
    close(f_i, want_i)


# ------------------------------------------------------------------ eq. 3-4
def test_generator_graph_keeps_top_k_cosine_items_for_every_user():
    """Eq. 3: G^m keeps, for EVERY user, the k items with the largest cos(f_u^m, f_i^m) (not the dot)."""
    f_u = rnd(3, 4, 3)
    f_i = rnd(4, 6, 3) * np.array([[0.1], [5.0], [0.3], [3.0], [1.0], [0.2]])  # norms differ: dot ≠ cos order
    k = 2
    cos = np.array([[ref_cos(f_u[u], f_i[i]) for i in range(6)] for u in range(4)])
    want = [set(np.argsort(-cos[u])[:k].tolist()) for u in range(4)]
    dot_sets = [set(np.argsort(-(f_u @ f_i.T)[u])[:k].tolist()) for u in range(4)]
    assert want != dot_sets  # the input tells cosine from dot product
    for chunk in (1, 3, 100):
        g = generator_graph(t32(f_u), t32(f_i), k, chunk)
        assert [set(r) for r in g.cols.tolist()] == want, chunk


def test_modality_id_views_on_the_generated_graph():
    """Eq. 4: e_u^m = Σ_{i∈N^m_u} e_i / sqrt|N^m_u|, e_i^m = Σ_{u∈N^m_i} e_u / sqrt|N^m_i|; and its backward."""
    cols = [[0, 2], [2, 3], [0, 2], [4, 1]]      # item 5 has no user, item 2 three
    g = modality_id_operators(torch.tensor(cols), 6)
    e_user, e_item = rnd(5, 4, 3), rnd(6, 6, 3)
    eu = torch.tensor(e_user, dtype=torch.float32, requires_grad=True)
    ei = torch.tensor(e_item, dtype=torch.float32, requires_grad=True)
    got_u, got_i = modality_id_views(g, eu, ei)
    want_u, want_i = ref_id_views(cols, e_user, e_item)
    close(got_u, want_u)
    close(got_i, want_i)
    # backward: d(Σ c_u · e_u^m)/d e_i = Σ_{u: i∈N^m_u} c_u / sqrt|N^m_u|
    c = rnd(7, 4, 3)
    (got_u * t32(c)).sum().backward()
    want_grad = np.zeros_like(e_item)
    for u, items in enumerate(cols):
        for i in items:
            want_grad[i] += c[u] / math.sqrt(len(items))
    close(ei.grad, want_grad)


# ------------------------------------------------------------------ eq. 5
def test_inter_modal_attention_softmax_over_key_modalities():
    """Eq. 5 by loops: softmax over the key modalities m', mean over heads, then over m.

    README differences table, row 2 (attention with K built from Q and no value path, a linear
    no-op): the value depends on W^Q and W^K separately and is not the plain mean."""
    torch.manual_seed(0)
    att = InterModalAttention(8, 2).double()
    views = [rnd(10 + m, 4, 8) for m in range(3)]
    got = att([torch.tensor(v) for v in views])
    close(got, ref_attention(views, att.w_q.detach().numpy(), att.w_k.detach().numpy(), 2))
    assert np.abs(ref_attention(views, att.w_q.detach().numpy(), att.w_k.detach().numpy(), 2)
                  - np.mean(views, axis=0)).max() > 1e-2  # the input tells attention from a plain mean


# ------------------------------------------------------------------ eq. 6-7
@pytest.mark.parametrize("n_layers", [0, 1, 3])
def test_gnn_mean_over_layers_0_to_L(n_layers):
    """Eq. 6: LightGCN propagation on the observed graph; ê = mean over layers 0..L (layer 0 included)."""
    e_u0, e_i0 = rnd(8, 4, 3), rnd(9, 5, 3)
    a_u, a_i = ops()
    got_u, got_i = gnn(t32(e_u0), t32(e_i0), a_u, a_i, n_layers)
    want_u, want_i = ref_gnn(A, e_u0, e_i0, n_layers)
    close(got_u, want_u)
    close(got_i, want_i)


def test_fusion_adds_omega_times_normalised_views():
    """Eq. 7: h = ê + ω Σ_m f^m / ||f^m||_2; with no modality h = ê."""
    e_hat, views = rnd(10, 4, 3), [rnd(11, 4, 3), rnd(12, 4, 3) * 7.0]
    close(fusion(torch.tensor(e_hat), [torch.tensor(v) for v in views], 0.55), ref_fusion(e_hat, views, 0.55))
    close(fusion(torch.tensor(e_hat), [], 0.55), e_hat)


@pytest.mark.parametrize("attention", [True, False])
def test_propagate_composes_eqs_4_to_7(attention):
    """E^0 + η Ē/||Ē|| (Ē from attention, or the plain mean when off), GNN, then ω-fusion: end to end."""
    n_u, n_i, d = 4, 5, 4
    cfg = Config(embed_dim=d, n_heads=2, n_layers=2, modal_id_weight=0.7, fusion_weight=0.3,
                 attention=attention, device="cpu")
    feats = {"a": torch.zeros(n_i, 2), "b": torch.zeros(n_i, 3)}
    torch.manual_seed(1)
    a_u, a_i = ops()
    model = MMSSL(n_u, n_i, feats, a_u, a_i, cfg)
    cols = {"a": [[0, 1], [1, 2], [3, 4], [0, 2]], "b": [[4, 3], [0, 1], [1, 2], [2, 3]]}
    model.load_graph_state({m: torch.tensor(c) for m, c in cols.items()})
    f_user = {m: rnd(20 + j, n_u, d) for j, m in enumerate(feats)}
    f_item = {m: rnd(30 + j, n_i, d) for j, m in enumerate(feats)}
    out = model.propagate(Views({m: t32(v) for m, v in f_user.items()}, {m: t32(v) for m, v in f_item.items()}))

    E_u, E_i = model.user_emb.detach().double().numpy(), model.item_emb.detach().double().numpy()
    id_views = {m: ref_id_views(c, E_u, E_i) for m, c in cols.items()}
    for m in feats:
        close(out.e_user_mod[m], id_views[m][0])
    wq, wk = model.attention.w_q.detach().double().numpy(), model.attention.w_k.detach().double().numpy()
    bar = []
    for side in (0, 1):
        vs = [id_views[m][side] for m in feats]
        bar.append(ref_attention(vs, wq, wk, 2) if attention else np.mean(vs, axis=0))
    e0_u = E_u + 0.7 * bar[0] / np.linalg.norm(bar[0], axis=1, keepdims=True)
    e0_i = E_i + 0.7 * bar[1] / np.linalg.norm(bar[1], axis=1, keepdims=True)
    hat_u, hat_i = ref_gnn(A, e0_u, e0_i, 2)
    close(out.h_user, ref_fusion(hat_u, list(f_user.values()), 0.3))
    close(out.h_item, ref_fusion(hat_i, list(f_item.values()), 0.3))


# ------------------------------------------------------------------ BPR, L2, InfoNCE
def test_bpr_loss_by_value():
    """L_BPR = mean_u -log σ(h_u·h_i - h_u·h_j)."""
    h, p, n = rnd(13, 5, 3), rnd(14, 5, 3), rnd(15, 5, 3)
    want = np.mean([-math.log(1 / (1 + math.exp(-(h[u] @ p[u] - h[u] @ n[u])))) for u in range(5)])
    close(bpr_loss(torch.tensor(h), torch.tensor(p), torch.tensor(n)), want)


def test_l2_penalty_by_value():
    """λ4's term: Σ of the squared batch ego embeddings (users, positives, negatives) / batch size."""
    e = [rnd(16 + j, 5, 3) for j in range(3)]
    close(l2_penalty(*(torch.tensor(x) for x in e)), sum((x ** 2).sum() for x in e) / 5)


@pytest.mark.parametrize("tau", [0.5, 0.2])
def test_info_nce_positives_and_negatives(tau):
    """InfoNCE anchored at h_u: positive e_u^m; negatives e^m_{u'} and h_{u'} of the other users."""
    h, e = rnd(19, 5, 4), rnd(20, 5, 4) * 3.0
    close(info_nce(torch.tensor(h), torch.tensor(e), tau), ref_info_nce(h, e, tau))


# ------------------------------------------------------------------ fake and real rows
def test_fake_rows_cosine_observed_zeroed_normalised():
    """Â^m[u,:] = cos(f_u^m, f_i^m) with the user's observed items zeroed, then L2-normalised."""
    f_u, f_i = rnd(21, 4, 3), rnd(22, 5, 3) * np.array([[0.1], [2.0], [1.0], [4.0], [0.5]])
    row = np.array([[0.0 if A[u, i] else ref_cos(f_u[u], f_i[i]) for i in range(5)] for u in range(4)])
    want = row / np.linalg.norm(row, axis=1, keepdims=True)
    close(fake_rows(torch.tensor(f_u), torch.tensor(f_i), torch.tensor(A)), want)


def ref_real_rows(a, g, h_u, h_i, tau, zeta, gumbel=True, augment=True):
    """Ã[u,:] = softmax_i((A[u,i] + g_ui)/τ) + ζ cos(h_u, h_i)·1[i unobserved], L2-normalised."""
    out = np.zeros_like(a)
    for u in range(a.shape[0]):
        if gumbel:
            z = (a[u] + g[u]) / tau
            s = np.exp(z - z.max())
            out[u] = s / s.sum()
        else:
            out[u] = a[u]
        if augment:
            out[u] += [zeta * ref_cos(h_u[u], h_i[i]) * (1 - a[u, i]) for i in range(a.shape[1])]
        out[u] /= np.linalg.norm(out[u])
    return out


@pytest.mark.parametrize("gumbel,augment", [(True, True), (True, False), (False, True)])
def test_real_rows_gumbel_softmax_plus_zeta_cosine(gumbel, augment):
    """Real rows from the same uniform draws: (A + g)/τ inside the softmax, g = -log(-log U),
    the ζ·cos part without the user's observed items, h detached; L2-normalised.

    README differences table, row 4 (Gumbel: only the noise divided by τ): τ = 0.5 tells
    softmax((A + g)/τ) from softmax(A + g/τ)."""
    a = A[:3]
    h_u = torch.tensor(rnd(23, 3, 3), requires_grad=True)
    h_i = torch.tensor(rnd(24, 5, 3), requires_grad=True)
    torch.manual_seed(9)
    got = gumbel_real_rows(torch.tensor(a), h_u, h_i, 0.5, 0.8, gumbel=gumbel, augment=augment)
    torch.manual_seed(9)
    uni = torch.rand(3, 5, dtype=torch.float64).clamp(1e-10, 1 - 1e-7).numpy()
    g = -np.log(-np.log(uni))
    want = ref_real_rows(a, g, h_u.detach().numpy(), h_i.detach().numpy(), 0.5, 0.8, gumbel, augment)
    close(got, want)
    assert not got.requires_grad  # h is detached: no gradient reaches the generator from real rows


# ------------------------------------------------------------------ discriminator, GP, L_D, L_G
def _randomised_discriminator(n_items, p1=0.0, p2=0.0):
    torch.manual_seed(4)
    d = Discriminator(n_items, p1, p2).double()
    with torch.no_grad():
        for bn in (d.rest1[1], d.gamma2[2]):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.3, 0.3), bn.running_var.uniform_(0.5, 2.0)
    return d


def test_discriminator_widths_layer_order_and_slope_eval():
    """D: widths |I| -> |I|/4 -> |I|/8 -> 1; Linear, LeakyReLU(0.2), BN, Dropout in that order; sigmoid out.

    README differences table, row 3 (LeakyReLU(True): slope 1, an affine discriminator)."""
    d = _randomised_discriminator(40).eval()
    assert (d.lin1.in_features, d.lin1.out_features) == (40, 10)
    assert (d.gamma2[0].in_features, d.gamma2[0].out_features) == (10, 5)
    assert (d.out.in_features, d.out.out_features) == (5, 1)
    x = rnd(25, 6, 40)
    close(d(torch.tensor(x)), ref_discriminator(d, x))
    for n_items, widths in ((6, (1, 1)), (12, (3, 1)), (17, (4, 2))):  # floor division, at least 1
        small = Discriminator(n_items, 0.0, 0.0)
        assert (small.lin1.out_features, small.gamma2[0].out_features) == widths, n_items


def test_discriminator_train_mode_batch_norm_and_dropout():
    """Train mode: BN on the batch's statistics, dropout (p1, p2) after each BN, same masks as drawn."""
    d = _randomised_discriminator(40, 0.31, 0.5).train()
    x = rnd(26, 8, 40)
    torch.manual_seed(12)
    got = d(torch.tensor(x))
    torch.manual_seed(12)
    m1 = torch.empty(8, 10, dtype=torch.float64).bernoulli_(1 - 0.31).numpy()
    m2 = torch.empty(8, 5, dtype=torch.float64).bernoulli_(1 - 0.5).numpy()
    close(got, ref_discriminator(d, x, (m1, m2, 0.31, 0.5)))


def test_gradient_penalty_numpy_reference():
    """WGAN-GP: mean_r (||∇_x D(x_r)||_2 - 1)^2, x_r = α_r real_r + (1 - α_r) fake_r, α_r ~ U(0,1)."""
    w = rnd(27, 6, 4)
    critic, _, grad = tanh_critic(w)
    real, fake = rnd(28, 5, 6), rnd(29, 5, 6)
    torch.manual_seed(13)
    got = gradient_penalty(critic, torch.tensor(real), torch.tensor(fake))
    torch.manual_seed(13)
    alpha = torch.rand(5, 1, dtype=torch.float64).numpy()
    x = alpha * real + (1 - alpha) * fake
    close(got, np.mean((np.linalg.norm(grad(x), axis=1) - 1) ** 2))


def test_discriminator_loss_pairs_each_fake_row_with_its_users_real_row():
    """L_D = mean D(fake) - mean D(real) + λ1 GP; fake = [modality 1 rows; modality 2 rows], the
    interpolation of fake row (m, u) uses user u's real row."""
    w = rnd(30, 6, 4)
    critic, value, grad = tanh_critic(w)
    real, fake = rnd(31, 3, 6), rnd(32, 6, 6)             # 3 users, 2 modalities
    torch.manual_seed(14)
    got = discriminator_loss(critic, torch.tensor(real), torch.tensor(fake), 0.3)
    torch.manual_seed(14)
    alpha = torch.rand(6, 1, dtype=torch.float64).numpy()
    gp = []
    for m in range(2):
        for u in range(3):
            r = m * 3 + u
            x = alpha[r] * real[u] + (1 - alpha[r]) * fake[r]
            gp.append((np.linalg.norm(grad(x[None])[0]) - 1) ** 2)
    close(got, value(fake).mean() - value(real).mean() + 0.3 * np.mean(gp))
    close(discriminator_loss(critic, torch.tensor(real), torch.tensor(fake), 0.0),
          value(fake).mean() - value(real).mean())


def test_generator_loss_by_value_and_gradient():
    """L_G = -mean D(fake); its gradient reaches the fake rows."""
    w = rnd(33, 6, 4)
    critic, value, grad = tanh_critic(w)
    fake = torch.tensor(rnd(34, 4, 6), requires_grad=True)
    loss = generator_loss(critic, fake)
    close(loss, -value(fake.detach().numpy()).mean())
    loss.backward()
    close(fake.grad, -grad(fake.detach().numpy()) / 4)


# ------------------------------------------------------------------ the objective, wired in one step
def test_train_step_objective_and_wiring(tiny, small_cfg, monkeypatch):
    """L = L_BPR + λ2 Σ_m L_CL^m + λ3 L_G + λ4 reg on the batch; the D step sees detached rows;
    real rows get the batch users' observed rows and h_u; fake rows f_u^m of the batch users; D is
    frozen while L_G is computed."""
    # the dense discriminator path, whose functions are spied here; the factored default is pinned
    # equal to it by tests/test_factored.py
    cfg = small_cfg.replace(dropout=0.0, cl_weight=0.7, adv_weight=0.4, l2_weight=0.3, disc_impl="dense")
    run = Run(cfg, tiny, torch.device("cpu"))
    users, pos, neg = (torch.from_numpy(a) for a in run.sampler.sample())
    ref = Run(cfg, tiny, torch.device("cpu")).model  # same seed: the same initial weights
    views = ref.modality_views()
    ref.rebuild_graphs(views)
    out = ref.propagate(views)
    seen = {}
    real_fn, fake_fn, d_fn, g_fn = (mmssl.step.gumbel_real_rows, mmssl.step.fake_rows,
                                    mmssl.step.discriminator_loss, mmssl.step.generator_loss)

    def spy_real(observed, h_u, *a, **k):
        seen["observed"], seen["h_u"] = observed.clone(), h_u.detach().clone()
        return real_fn(observed, h_u, *a, **k)

    def spy_fake(f_u_b, f_i, observed):
        seen.setdefault("f_u", []).append(f_u_b.detach().clone())
        return fake_fn(f_u_b, f_i, observed)

    def spy_d(critic, real, fake, gp):
        seen["d_detached"] = not real.requires_grad and not fake.requires_grad
        seen["d_value"] = d_fn(critic, real, fake, gp)
        return seen["d_value"]

    def spy_g(critic, fake):
        seen["frozen"] = not any(p.requires_grad for p in critic.parameters())
        seen["g_value"] = g_fn(critic, fake)
        return seen["g_value"]

    for name, fn in (("gumbel_real_rows", spy_real), ("fake_rows", spy_fake), ("discriminator_loss", spy_d),
                     ("generator_loss", spy_g)):
        monkeypatch.setattr(mmssl.step, name, fn)
    terms = train_step(run.model, run.disc, run.opt, run.opt_d, run.train_t, users, pos, neg, cfg, rebuild=True)
    loss, bpr, cl, g, d, reg = terms.tolist()

    h = out.h_user.detach().double().numpy()[users.numpy()]
    hp, hn = (out.h_item.detach().double().numpy()[x.numpy()] for x in (pos, neg))
    close(bpr, np.mean(np.log1p(np.exp(-((h * hp).sum(1) - (h * hn).sum(1))))), 1e-5)
    want_cl = sum(ref_info_nce(h, out.e_user_mod[m].detach().double().numpy()[users.numpy()], cfg.cl_tau)
                  for m in ref.modalities)
    close(cl, want_cl, 1e-5)
    E_u, E_i = ref.user_emb.detach().double().numpy(), ref.item_emb.detach().double().numpy()
    want_reg = ((E_u[users.numpy()] ** 2).sum() + (E_i[pos.numpy()] ** 2).sum()
                + (E_i[neg.numpy()] ** 2).sum()) / len(users)
    close(reg, want_reg, 1e-5)
    close(g, seen["g_value"].item(), 1e-6)
    close(d, seen["d_value"].item(), 1e-6)
    close(loss, bpr + 0.7 * cl + 0.4 * g + 0.3 * reg, 1e-5)
    close(seen["observed"], tiny.train.toarray()[users.numpy()])
    close(seen["h_u"], h, 1e-5)
    assert len(seen["f_u"]) == len(ref.modalities)
    for f_u_b, m in zip(seen["f_u"], ref.modalities):
        close(f_u_b, views.f_user[m].detach().numpy()[users.numpy()], 1e-5)
    assert seen["d_detached"] and seen["frozen"]
    assert all(p.requires_grad for p in run.disc.parameters())  # unfrozen again after the G step
