"""The MMSSL encoder (eqs. 1-7 of the design doc) and its discriminator.

Read top to bottom: :meth:`MMSSL.modality_views` (eqs. 1-2), :meth:`MMSSL.rebuild_graphs`
(eq. 3), :meth:`MMSSL.propagate` (eqs. 4-7). One named function per equation;
each carries the paper's symbols in its docstring.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmssl.config import Config
from mmssl.graph import GeneratedGraph, SparseOp, generator_graph, modality_id_operators, topk_count


def modality_projection(x: torch.Tensor, proj: nn.Linear, dropout: nn.Dropout) -> torch.Tensor:
    """Eq. 1: f̄_i^m = Dropout(W_m x_i^m + b_m), d_m -> d."""
    return dropout(proj(x))


def modality_views(f_bar: torch.Tensor, a_u: SparseOp, a_i: SparseOp) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2: f_u^m = Σ_{i∈N_u} f̄_i^m / sqrt|N_u| and f_i^m = Σ_{u∈N_i} f_u^m / sqrt|N_i|."""
    f_u = a_u(f_bar)
    return f_u, a_i(f_u)


def modality_id_views(g: GeneratedGraph, e_user: torch.Tensor, e_item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4: e_u^m = Σ_{i∈N^m_u} e_i / sqrt|N^m_u|, e_i^m = Σ_{u∈N^m_i} e_u / sqrt|N^m_i| on G^m."""
    return g(e_item), g.item_side(e_user)


class InterModalAttention(nn.Module):
    """Eq. 5: per head h, softmax_{m'}((e^m W_h^Q)·(e^{m'} W_h^K) / sqrt(d/H)); ē^m = mean_h Σ_{m'} w · e^{m'}.

    Returns Ē = mean_m ē^m. Both W^Q and W^K enter the logits, so both get gradients
    (the released code built K from Q and had no value path).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.dh = heads, dim // heads
        self.w_q = nn.Parameter(nn.init.xavier_uniform_(torch.empty(dim, dim)))
        self.w_k = nn.Parameter(nn.init.xavier_uniform_(torch.empty(dim, dim)))

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(views, dim=1)                                   # N x M x d
        n, m, _ = x.shape
        q = (x @ self.w_q).view(n, m, self.heads, self.dh).transpose(1, 2)   # N x H x M x dh
        k = (x @ self.w_k).view(n, m, self.heads, self.dh).transpose(1, 2)
        w = torch.softmax(q @ k.transpose(-1, -2) / self.dh ** 0.5, dim=-1)  # N x H x M x M'
        e_bar = (w @ x.unsqueeze(1)).mean(dim=1)                        # N x M x d (mean over heads)
        return e_bar.mean(dim=1)


def gnn(e0_user: torch.Tensor, e0_item: torch.Tensor, a_u: SparseOp, a_i: SparseOp,
        n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6 (LightGCN-style): Ê^{l+1} from the observed graph, ê = mean over layers 0..L."""
    us, its = [e0_user], [e0_item]
    for _ in range(n_layers):
        u_next, i_next = a_u(its[-1]), a_i(us[-1])
        us.append(u_next)
        its.append(i_next)
    return torch.stack(us).mean(0), torch.stack(its).mean(0)


def fusion(e_hat: torch.Tensor, views: list[torch.Tensor], omega: float) -> torch.Tensor:
    """Eq. 7: h = ê + ω Σ_m f^m / ||f^m||_2 (row-wise)."""
    if not views:
        return e_hat
    return e_hat + omega * sum(F.normalize(v, dim=1) for v in views)


@dataclass
class Views:
    """Output of eqs. 1-2 for every modality: user and item views f_u^m, f_i^m."""
    f_user: dict[str, torch.Tensor]
    f_item: dict[str, torch.Tensor]


@dataclass
class Output:
    """Everything a training step needs from one forward pass."""
    h_user: torch.Tensor            # U x d, eq. 7
    h_item: torch.Tensor            # I x d
    e_user_mod: dict[str, torch.Tensor]   # e_u^m, eq. 4 (the contrastive views)
    views: Views


class MMSSL(nn.Module):
    """The MMSSL encoder. ``features`` maps modality name -> float32 [n_items, d_m] tensor."""

    def __init__(self, n_users: int, n_items: int, features: dict[str, torch.Tensor],
                 a_u: SparseOp, a_i: SparseOp, cfg: Config):
        super().__init__()
        self.cfg, self.a_u, self.a_i = cfg, a_u, a_i
        self.n_users, self.n_items = n_users, n_items
        self.modalities = list(features)
        d = cfg.embed_dim
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users, d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, d)))
        self.proj = nn.ModuleDict({m: nn.Linear(x.shape[1], d) for m, x in features.items()})
        for m, x in features.items():
            self.register_buffer(f"feat_{m}", x, persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attention = InterModalAttention(d, cfg.n_heads)
        self.k = topk_count(cfg.topk_rate, n_items)
        self.graphs: dict[str, GeneratedGraph] = {}

    def feature(self, m: str) -> torch.Tensor:
        return getattr(self, f"feat_{m}")

    def modality_views(self) -> Views:
        """Eqs. 1-2 for every modality."""
        f_user, f_item = {}, {}
        for m in self.modalities:
            f_bar = modality_projection(self.feature(m), self.proj[m], self.dropout)
            f_user[m], f_item[m] = modality_views(f_bar, self.a_u, self.a_i)
        return Views(f_user, f_item)

    @torch.no_grad()
    def rebuild_graphs(self, views: Views) -> None:
        """Eq. 3 for every modality and EVERY user, from the current (detached) views."""
        for m in self.modalities:
            self.graphs[m] = generator_graph(views.f_user[m].detach(), views.f_item[m].detach(),
                                             self.k, self.cfg.eval_chunk)

    def propagate(self, views: Views) -> Output:
        """Eqs. 4-7: modality ID views, attention, GNN with η-weighted layer 0, fusion with ω."""
        cfg = self.cfg
        e_user_mod: dict[str, torch.Tensor] = {}
        e_item_mod: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            e_user_mod[m], e_item_mod[m] = modality_id_views(self.graphs[m], self.user_emb, self.item_emb)
        e0_user, e0_item = self.user_emb, self.item_emb
        if self.modalities:
            if cfg.attention:
                bar_u = self.attention(list(e_user_mod.values()))
                bar_i = self.attention(list(e_item_mod.values()))
            else:
                bar_u = torch.stack(list(e_user_mod.values())).mean(0)
                bar_i = torch.stack(list(e_item_mod.values())).mean(0)
            e0_user = e0_user + cfg.modal_id_weight * F.normalize(bar_u, dim=1)
            e0_item = e0_item + cfg.modal_id_weight * F.normalize(bar_i, dim=1)
        hat_u, hat_i = gnn(e0_user, e0_item, self.a_u, self.a_i, cfg.n_layers)
        h_user = fusion(hat_u, list(views.f_user.values()), cfg.fusion_weight)
        h_item = fusion(hat_i, list(views.f_item.values()), cfg.fusion_weight)
        return Output(h_user, h_item, e_user_mod, views)

    def forward(self, rebuild: bool = False) -> Output:
        views = self.modality_views()
        if rebuild or (self.modalities and not self.graphs):
            self.rebuild_graphs(views)
        return self.propagate(views)

    def graph_state(self) -> dict[str, torch.Tensor]:
        """The generated graphs as their k neighbour columns per user (for checkpoints)."""
        return {m: g.cols.clone() for m, g in self.graphs.items()}

    def load_graph_state(self, state: dict[str, torch.Tensor]) -> None:
        dev = self.user_emb.device
        self.graphs = {m: modality_id_operators(c.to(dev), self.n_items) for m, c in state.items()}


class Discriminator(nn.Module):
    """D(a) = sigmoid(Linear(Γ(Γ(a)))), Γ(a) = Dropout(BN(LeakyReLU_0.2(Linear(a)))); |I| -> |I|/4 -> |I|/8 -> 1.

    :meth:`first_layer` is kept separate: it is the |I| x |I|/4 product where nearly
    all the time goes. :meth:`head` is everything after it (LeakyReLU, BN, dropout, the
    second layer and the output), so that ``D(x) = head(first_layer(x))`` and the factored
    path (``mmssl.factored``, ``disc_impl: factored``) feeds ``head`` the exact first-layer
    output of rows it never forms.
    """

    def __init__(self, n_items: int, p1: float, p2: float):
        super().__init__()
        w1, w2 = max(1, n_items // 4), max(1, n_items // 8)
        self.lin1 = nn.Linear(n_items, w1)
        self.rest1 = nn.Sequential(nn.LeakyReLU(0.2), nn.BatchNorm1d(w1), nn.Dropout(p1))
        self.gamma2 = nn.Sequential(nn.Linear(w1, w2), nn.LeakyReLU(0.2), nn.BatchNorm1d(w2), nn.Dropout(p2))
        self.out = nn.Linear(w2, 1)

    def first_layer(self, rows: torch.Tensor) -> torch.Tensor:
        """rows -> W_1 rows + b_1 (the |I| x |I|/4 step)."""
        return self.lin1(rows)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """z = W_1 x + b_1 [n, |I|/4] -> D(x) = sigmoid(Linear(Γ_2(Dropout(BN(LeakyReLU(z)))))) [n]."""
        return torch.sigmoid(self.out(self.gamma2(self.rest1(z)))).squeeze(-1)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [n, |I|] -> D(rows) [n] in (0, 1)."""
        return self.head(self.first_layer(rows))
