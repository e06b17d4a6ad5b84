"""MMSSL's loss terms: one function per equation of the design doc, symbols in the docstrings."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bpr_loss(h_user: torch.Tensor, h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
    """L_BPR = mean_u -log σ(ŷ_ui - ŷ_uj), ŷ_ui = h_u · h_i, one sampled negative j per user."""
    return F.softplus(-((h_user * h_pos).sum(1) - (h_user * h_neg).sum(1))).mean()


def l2_penalty(*embeddings: torch.Tensor) -> torch.Tensor:
    """||batch embeddings||^2 (weighted by λ4): Σ of squared ego embeddings of the batch, / batch size."""
    n = embeddings[0].shape[0]
    return sum(e.pow(2).sum() for e in embeddings) / n


def info_nce(h: torch.Tensor, e: torch.Tensor, tau: float) -> torch.Tensor:
    """L_CL for one modality: InfoNCE between h_u and e_u^m, similarity cos/τ'.

    Anchor h_u; positive e_u^m; negatives e^m_{u'} and h_{u'} of the other batch users.
    """
    hn, en = F.normalize(h, dim=1), F.normalize(e, dim=1)
    cross = hn @ en.T / tau                          # s(h_u, e_{u'})
    intra = hn @ hn.T / tau                          # s(h_u, h_{u'}), own pair masked out
    intra = intra.masked_fill(torch.eye(len(h), dtype=torch.bool, device=h.device), float("-inf"))
    logits = torch.cat([cross, intra], dim=1)
    return F.cross_entropy(logits, torch.arange(len(h), device=h.device))


def fake_rows(f_user_b: torch.Tensor, f_item: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Fake rows: Â^m[u, :] = cos(f_u^m, f_i^m) for the batch users, observed items zeroed, L2-normalised."""
    s = F.normalize(f_user_b, dim=1) @ F.normalize(f_item, dim=1).T
    return F.normalize(s * (1.0 - observed), dim=1)


def gumbel_real_rows(observed: torch.Tensor, h_user_b: torch.Tensor, h_item: torch.Tensor, tau: float,
                     zeta: float, gumbel: bool = True, augment: bool = True) -> torch.Tensor:
    """Real rows: Ã[u, :] = softmax_i((A[u,i] + g_ui) / τ) + ζ · cos(h_u, h_i), L2-normalised.

    g = -log(-log(U(0,1))); the cosine part has the observed items zeroed; h is detached.
    The whole sum (A + g) is divided by τ (the released code divided only g).
    ``gumbel=False``: the raw observed row replaces the softmax; ``augment=False``: no ζ term.
    """
    if gumbel:
        u = torch.rand_like(observed).clamp_(1e-10, 1.0 - 1e-7)
        real = torch.softmax((observed - torch.log(-torch.log(u))) / tau, dim=1)
    else:
        real = observed
    if augment:
        cos = F.normalize(h_user_b.detach(), dim=1) @ F.normalize(h_item.detach(), dim=1).T
        real = real + zeta * cos * (1.0 - observed)
    return F.normalize(real, dim=1)


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: mean((||∇_x D(x)||_2 - 1)^2), x = α real + (1 - α) fake, α ~ U(0,1) per row."""
    alpha = torch.rand(real.shape[0], 1, device=real.device, dtype=real.dtype)
    x = (alpha * real + (1.0 - alpha) * fake).requires_grad_(True)
    out = critic(x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return (grad.norm(2, dim=1) - 1.0).pow(2).mean()


def discriminator_loss(critic, real: torch.Tensor, fake: torch.Tensor, gp_weight: float) -> torch.Tensor:
    """L_D = mean D(fake) - mean D(real) + λ1 · GP(real, fake). ``fake`` holds every modality's rows."""
    reps = fake.shape[0] // real.shape[0]
    loss = critic(fake).mean() - critic(real).mean()
    if gp_weight > 0:
        loss = loss + gp_weight * gradient_penalty(critic, real.repeat(reps, 1), fake)
    return loss


def generator_loss(critic, fake: torch.Tensor) -> torch.Tensor:
    """L_G = -mean D(fake), gradients flowing into the generator (not into D)."""
    return -critic(fake).mean()
