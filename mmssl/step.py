"""One training batch of MMSSL: sampling, the single forward pass, the D step and the G step.

``train_step`` is the whole method for one batch, top to bottom:

1. one forward pass with gradients (eqs. 1-7; generated graphs rebuilt every T batches);
2. BPR, InfoNCE (λ2, τ'), L2 (λ4) on the batch;
3. fake rows Â^m[u,:] (with gradients) and real rows Ã[u,:] (detached, τ, ζ): with
   ``disc_impl: factored`` (default) as :class:`mmssl.factored.FactoredRows`, never formed,
   with ``dense`` as B x |I| tensors (the reference form, for checking and benchmarks);
4. D step on the detached rows: L_D with the gradient penalty (λ1); the backward computes
   only the discriminator's gradients (not the unused one w.r.t. the interpolated rows);
5. G step: L = L_BPR + λ2 L_CL + λ3 L_G + λ4 ||E_batch||^2, one backward, one optimizer step.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict

import numpy as np
import scipy.sparse as sp
import torch

from mmssl.config import Config
from mmssl.data import flat_keys
from mmssl.errors import DataError
from mmssl.factored import (factored_discriminator_loss, factored_fake_rows, factored_generator_loss,
                            factored_real_rows)
from mmssl.graph import batch_pairs, batch_rows
from mmssl.losses import (bpr_loss, discriminator_loss, fake_rows, generator_loss, gumbel_real_rows, info_nce,
                          l2_penalty)

LOSS_TERMS = ("train/loss", "train/loss_bpr", "train/loss_cl", "train/loss_g", "train/loss_d", "train/loss_reg")


class PhaseTimer:
    """Wall time per named phase (synchronising CUDA around each phase when enabled)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.totals[name] += time.perf_counter() - t0


def no_timer(name: str):
    """The default phase timer: does nothing (no device syncs in the training loop)."""
    return contextlib.nullcontext()


class BatchSampler:
    """Batches of distinct users with one train positive and one uniform negative each.

    An epoch is ceil(|train| / batch_size) batches, so that it sees as many positives
    as there are train interactions. All randomness comes from ``rng`` (a numpy
    Generator whose state is checkpointed). Users with no train item, or with every item
    in train (no negative exists), are never sampled; raises DataError when no user is left.
    """

    def __init__(self, train: sp.csr_matrix, batch_size: int, rng: np.random.Generator):
        self.indptr, self.indices = train.indptr.astype(np.int64), train.indices.astype(np.int64)
        self.n_items = train.shape[1]
        self.deg = np.diff(self.indptr)
        # a user with every item in train has no negative to draw: BPR cannot use them
        self.active = np.flatnonzero((self.deg > 0) & (self.deg < self.n_items))
        if not len(self.active):
            raise DataError(f"no user has both a train item and an item left to sample as a negative "
                            f"({train.shape[0]} users, {self.n_items} items): BPR cannot train")
        self.batch = min(batch_size, len(self.active))
        self.n_batches = max(1, math.ceil(train.nnz / batch_size))
        self.keys = flat_keys(train)                            # sorted: CSR with sorted indices
        self.rng = rng

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = self.rng
        users = rng.choice(self.active, size=self.batch, replace=False)
        pos = self.indices[self.indptr[users] + (rng.random(self.batch) * self.deg[users]).astype(np.int64)]
        neg = rng.integers(0, self.n_items, self.batch)
        bad = self._observed(users, neg)
        while bad.any():
            neg[bad] = rng.integers(0, self.n_items, int(bad.sum()))
            bad[bad] = self._observed(users[bad], neg[bad])
        return users, pos, neg

    def _observed(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users * self.n_items + items
        at = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
        return self.keys[at] == keys


def train_step(model, disc, opt, opt_d, train_t: torch.Tensor, users, pos, neg, cfg: Config,
               rebuild: bool, timer=no_timer, d_grads_only: bool = True) -> torch.Tensor:
    """One batch (see the module docstring). Returns the detached loss terms in LOSS_TERMS order.

    ``d_grads_only=False`` makes the D step's backward also compute the (unused) gradient
    with respect to the dense path's interpolated rows, as before issue 6: only
    bench/epoch.py uses it, to compare with that baseline. Values are the same either way.
    """
    zero = torch.zeros((), device=users.device)
    mods = model.modalities
    adversarial = cfg.adversarial and disc is not None and bool(mods)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and users.device.type == "cuda")

    with timer("forward"):
        views = model.modality_views()
    if rebuild and mods:
        with timer("rebuild"):
            model.rebuild_graphs(views)
    with timer("forward"):
        out = model.propagate(views)
        h_u, h_p, h_n = out.h_user[users], out.h_item[pos], out.h_item[neg]
        loss_bpr = bpr_loss(h_u, h_p, h_n)
        loss_reg = l2_penalty(model.user_emb[users], model.item_emb[pos], model.item_emb[neg])
        loss_cl = zero
        if cfg.contrastive and mods:
            loss_cl = sum(info_nce(h_u, out.e_user_mod[m][users], cfg.cl_tau) for m in mods)
        factored = cfg.disc_impl == "factored"
        if adversarial:
            with amp:
                if factored:
                    pairs = batch_pairs(train_t, users)
                    fake = [factored_fake_rows(views.f_user[m][users], views.f_item[m], pairs) for m in mods]
                    real = factored_real_rows(pairs, len(users), h_u, out.h_item, cfg.gumbel_tau, cfg.aug_weight,
                                              gumbel=cfg.gumbel, augment=cfg.augment)
                else:
                    observed = batch_rows(train_t, users)
                    fake = torch.cat([fake_rows(views.f_user[m][users], views.f_item[m], observed) for m in mods])
                    real = gumbel_real_rows(observed, h_u, out.h_item, cfg.gumbel_tau, cfg.aug_weight,
                                            gumbel=cfg.gumbel, augment=cfg.augment)
    loss_d = loss_g = zero
    if adversarial:
        with timer("d_step"), amp:
            opt_d.zero_grad(set_to_none=True)
            if factored:
                loss_d = factored_discriminator_loss(disc, real.detach(), [f.detach() for f in fake], cfg.gp_weight)
            else:
                loss_d = discriminator_loss(disc, real.detach(), fake.detach(), cfg.gp_weight)
            loss_d.backward(inputs=[p for p in disc.parameters() if p.requires_grad] if d_grads_only else None)
            opt_d.step()
        with timer("g_step"), amp:
            disc.requires_grad_(False)
            loss_g = factored_generator_loss(disc, fake) if factored else generator_loss(disc, fake)
            disc.requires_grad_(True)
    with timer("g_step"):
        loss = loss_bpr + cfg.cl_weight * loss_cl + cfg.adv_weight * loss_g + cfg.l2_weight * loss_reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return torch.stack([loss, loss_bpr, loss_cl, loss_g, loss_d, loss_reg]).detach().float()
