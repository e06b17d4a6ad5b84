"""Train and evaluate MMSSL: ``fit`` (the API a tuner wraps) and the ``python -m mmssl.train`` CLI.

    python -m mmssl.train --out runs/demo                       # embedded synthetic data, CPU ok
    python -m mmssl.train --data ../shared/data/tiktok --out runs/tiktok --set adversarial=false
    python -m mmssl.train --resume runs/demo                    # continue an interrupted run exactly
    python -m mmssl.train --smoke-test --out /tmp/smoke         # seconds on a CPU

Model selection is on ``val/recall@20`` with early stopping (``patience``); the test
split is evaluated once, at the selected epoch.
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from mmssl.config import Config
from mmssl.data import Dataset
from mmssl.errors import ConfigError, DivergedError
from mmssl.fingerprint import check_same_data, fingerprint
from mmssl.graph import to_torch_csr, observed_operators
from mmssl.metrics import evaluate
from mmssl.model import MMSSL, Discriminator
from mmssl.step import LOSS_TERMS, BatchSampler, no_timer, train_step

SELECT = "val/recall@20"
# keys that may differ between a checkpoint's config and the resuming config
RESUME_FREE = {"epochs", "patience", "device", "eval_chunk", "amp", "disc_impl"}
OnEpoch = Callable[[int, dict[str, float], Callable[[Any], Path]], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config: device '{name}' requested but CUDA is not available")
    return torch.device(name)


def _writable(x: np.ndarray) -> np.ndarray:
    """``x``, copied only when read-only (e.g. zero-copy from Ray's object store), which torch
    would otherwise warn about on every run."""
    return x if x.flags.writeable else x.copy()


class Run:
    """Everything one training run holds: model, discriminator, optimizers, sampler, progress."""

    def __init__(self, cfg: Config, data: Dataset, device: torch.device):
        data = data.select_modalities(cfg.modalities)
        self.cfg, self.data, self.device = cfg, data, device
        torch.manual_seed(cfg.seed)
        a_u, a_i = observed_operators(data.train, device)
        feats = {m: torch.from_numpy(_writable(np.ascontiguousarray(x, dtype=np.float32))).to(device)
                 for m, x in data.features.items()}
        self.model = MMSSL(data.n_users, data.n_items, feats, a_u, a_i, cfg).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr)
        self.disc = self.opt_d = None
        if cfg.adversarial and feats:
            self.disc = Discriminator(data.n_items, cfg.d_dropout1, cfg.d_dropout2).to(device)
            self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.lr_d, betas=(0.5, 0.9))
        self.train_t = to_torch_csr(data.train.tocsr(), device)
        self.sampler = BatchSampler(data.train, cfg.batch_size, np.random.default_rng(cfg.seed))
        self.epoch, self.step = 0, 0
        self.best, self.best_epoch, self.bad_epochs = -1.0, 0, 0
        self.best_state: dict[str, Any] | None = None
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0
        self._fingerprint: dict[str, Any] | None = None

    @property
    def fingerprint(self) -> dict[str, Any]:
        """:func:`mmssl.fingerprint.fingerprint` of the data this run trains on (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.data)
        return self._fingerprint

    # -- one epoch ------------------------------------------------------------
    def train_epoch(self, timer=no_timer, progress: bool = False) -> dict[str, float]:
        self.model.train()
        if self.disc is not None:
            self.disc.train()
        n_terms = len(LOSS_TERMS)
        sums = torch.zeros(n_terms, device=self.device)
        first_bad = torch.full((n_terms,), float("inf"), device=self.device)  # batch index a term went NaN/inf
        n = self.sampler.n_batches
        for b in tqdm(range(n), desc=f"epoch {self.epoch + 1}", leave=False, disable=not progress, unit="batch"):
            users, pos, neg = (torch.from_numpy(a).to(self.device) for a in self.sampler.sample())
            rebuild = self.step % self.cfg.refresh_every == 0
            terms = train_step(self.model, self.disc, self.opt, self.opt_d, self.train_t, users, pos, neg,
                               self.cfg, rebuild, timer)
            sums += terms
            first_bad = torch.where(~torch.isfinite(terms) & torch.isinf(first_bad), float(b), first_bad)
            self.step += 1
        self.epoch += 1
        host = torch.cat([sums / n, first_bad]).tolist()           # the epoch's one host sync
        means, bad = dict(zip(LOSS_TERMS, host[:n_terms])), host[n_terms:]
        if any(np.isfinite(bad)):  # the term that broke first; at a tie, a component before the total
            term = LOSS_TERMS[min(range(n_terms), key=lambda t: (bad[t], t == 0))]
            raise DivergedError(self.epoch, term, means[term])
        return means

    @torch.no_grad()
    def evaluate(self, split: str, per_user: bool = False):
        """Full-ranking metrics on ``val`` (train excluded) or ``test`` (train and val excluded);
        with ``per_user``, ``(means, rows)`` as :func:`mmssl.metrics.evaluate` returns them."""
        self.model.eval()
        out = self.model()  # builds the generated graphs only if none exist yet
        self.model.train()
        d = self.data
        exclude, truth = ([d.train], d.val) if split == "val" else ([d.train, d.val], d.test)
        return evaluate(out.h_user, out.h_item, exclude, truth, chunk_size=self.cfg.eval_chunk, prefix=f"{split}/",
                        per_user=per_user)

    # -- best-model tracking and checkpoints ---------------------------------
    def record(self, metrics: dict[str, float]) -> bool:
        value = metrics[SELECT]
        improved = np.isfinite(value) and value > self.best
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, self.epoch, 0
            self.best_state = {"model": copy.deepcopy(self.model.state_dict()),
                               "graphs": self.model.graph_state(), "metrics": dict(metrics)}
        else:
            self.bad_epochs += 1
        return improved

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "graphs": self.model.graph_state(),
            "optimizer": self.opt.state_dict(),
            "discriminator": self.disc.state_dict() if self.disc is not None else None,
            "optimizer_d": self.opt_d.state_dict() if self.opt_d is not None else None,
            "epoch": self.epoch, "step": self.step, "best_metric": self.best, "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs, "best_state": self.best_state, "history": self.history,
            "seconds": self.seconds, "config": self.cfg.to_dict(), "data_fingerprint": self.fingerprint,
            "rng": {"torch": torch.get_rng_state(), "numpy": self.sampler.rng.bit_generator.state,
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def save(self, directory) -> Path:
        """Write ``directory/checkpoint.pt`` atomically; returns its path."""
        path = Path(directory) / "checkpoint.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".pt.tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def load(self, source) -> None:
        path = Path(source)
        path = path / "checkpoint.pt" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"{path}: no checkpoint to resume from")
        ck = torch.load(path, map_location=self.device, weights_only=False)
        check_resume(ck, self.cfg, self.fingerprint, path)
        self.model.load_state_dict(ck["model"])
        self.model.load_graph_state(ck["graphs"])
        self.opt.load_state_dict(ck["optimizer"])
        if self.disc is not None:
            self.disc.load_state_dict(ck["discriminator"])
            self.opt_d.load_state_dict(ck["optimizer_d"])
        for key in ("epoch", "step", "bad_epochs", "best_state", "history", "seconds", "best_epoch"):
            setattr(self, key, ck[key])
        self.best = ck["best_metric"]
        torch.set_rng_state(ck["rng"]["torch"].cpu())
        self.sampler.rng.bit_generator.state = ck["rng"]["numpy"]
        if ck["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ck["rng"]["cuda"]])

    def done(self) -> bool:
        return self.epoch >= self.cfg.epochs or (self.cfg.patience > 0 and self.bad_epochs >= self.cfg.patience)


def check_resume(checkpoint: dict[str, Any], cfg: Config, data_fingerprint: dict[str, Any], where) -> None:
    """Refuse to continue ``checkpoint`` with another config or on other data.

    Raises :class:`ConfigError` naming the config keys that differ (except
    ``RESUME_FREE``), or :class:`mmssl.errors.DataError` naming what changed in the
    data (:func:`mmssl.fingerprint.check_same_data`; a checkpoint without a
    fingerprint, from before they existed, is accepted).
    """
    diff = sorted(k for k, v in checkpoint["config"].items() if k not in RESUME_FREE and cfg.to_dict().get(k) != v)
    if diff:
        raise ConfigError(f"{where}: checkpoint was trained with a different config ({', '.join(diff)})")
    check_same_data(checkpoint.get("data_fingerprint"), data_fingerprint, str(where))


def fit(config: Config, data: Dataset, on_epoch: OnEpoch | None = None, resume_from=None,
        timer=no_timer, progress: bool = False, per_user: bool = False) -> dict[str, Any]:
    """Train MMSSL on ``data`` with ``config``; returns the result dict.

    ``on_epoch(epoch, metrics, save_checkpoint)`` is called after each epoch's
    validation; ``save_checkpoint(directory)`` writes ``directory/checkpoint.pt``.
    ``resume_from`` (a checkpoint file or its directory) continues a run exactly.
    ``per_user=True`` adds ``result["per_user"]``: the test metrics of every evaluated user
    from the same evaluator call, ``{"user": int64 [n_eval], "test/recall@10": float64
    [n_eval], ...}`` (see :func:`mmssl.metrics.evaluate`); their means are the ``test/*`` values.
    Raises :class:`DivergedError` when a loss term turns NaN/inf.
    """
    run = Run(config, data, resolve_device(config.device))
    if resume_from is not None:
        run.load(resume_from)
    t0 = time.perf_counter() - run.seconds
    while not run.done():
        t_epoch = time.perf_counter()
        metrics: dict[str, float] = {"epoch": run.epoch + 1}
        metrics.update(run.train_epoch(timer, progress))
        with timer("evaluate"):
            metrics.update(run.evaluate("val"))
        metrics["time/epoch_s"] = time.perf_counter() - t_epoch
        run.record(metrics)
        metrics["best/val/recall@20"], metrics["best/epoch"] = run.best, run.best_epoch
        run.history.append(metrics)
        run.seconds = time.perf_counter() - t0
        if on_epoch is not None:
            on_epoch(run.epoch, metrics, run.save)
    result: dict[str, Any] = {"best_epoch": run.best_epoch, "epochs_run": run.epoch,
                              "stopped_early": run.epoch < config.epochs}
    if run.best_state is not None:
        run.model.load_state_dict(run.best_state["model"])
        run.model.load_graph_state(run.best_state["graphs"])
        result.update({k: v for k, v in run.best_state["metrics"].items() if k.startswith("val/")})
    if per_user:
        test, result["per_user"] = run.evaluate("test", per_user=True)
        result.update(test)
    else:
        result.update(run.evaluate("test"))
    result["seconds"] = time.perf_counter() - t0
    result["config"] = config.to_dict()
    return result


if __name__ == "__main__":
    from mmssl.train_cli import main_entry

    raise SystemExit(main_entry())
