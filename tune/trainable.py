"""The Ray Tune trainable: a thin wrapper of ``mmssl.train.fit``.

One trial = one ``fit`` call. After every epoch it calls ``ray.tune.report`` with the
epoch's metrics (``epoch``, ``train/*``, ``val/*``, ``time/epoch_s``) plus

* ``best/<metric>`` and ``best/epoch``: the searched metric at fit's selected epoch
  (the best ``val/recall@20`` so far), the value ASHA and Optuna compare;
* ``trial/finished``: 1 on the report of the last epoch (``epoch == config.epochs``)
  and on one extra report sent after fit stopped itself (patience). A trial whose
  last report lacks it was stopped by the scheduler (see ``tune.searcher``).

Every ``checkpoint_every`` epochs the report carries a ``ray.tune.Checkpoint`` of
fit's exact resume state; a restarted trial resumes from ``ray.tune.get_checkpoint()``.
The data set comes in once through ``tune.with_parameters`` (object store), torch
uses the trial's CPUs, and the device follows Ray's GPU assignment.

A diverged trial is a result, not an error: fit's ``DivergedError`` becomes a last
report with ``trial/diverged = 1`` and ``trial/reason`` (one line, e.g.
``DivergedError: training diverged at epoch 3: train/loss_d = nan``), and the
trainable returns. The trial ends TERMINATED, Optuna is told FAIL, and Tune's
``FailureConfig`` never retries it: retries are for trials whose worker process or
node died (an error), which resume from their last checkpoint.

Every report also says where the trial runs: ``trial/node_id`` (Ray's node id) and
``trial/device`` (``cpu``, or ``cuda (GPU ids [..])`` with the GPU ids Ray assigned;
the trial uses ``cuda``, i.e. the one GPU Ray made visible, never a fixed index).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from mmssl import jsonio
from mmssl.config import Config
from mmssl.data import Dataset
from mmssl.errors import DivergedError
from mmssl.train import SELECT, fit
from tune.searcher import DIVERGED_KEY, FINISHED_KEY, REASON_KEY

STATE_FILE = "tune_state.json"
NODE_KEY = "trial/node_id"
DEVICE_KEY = "trial/device"
# Testing hook, read by the driver: a directory; the first trial that claims it diverges at epoch 1.
FAULT_ENV = "MMSSL_TUNE_INJECT_DIVERGENCE"
# Testing hook, read by the driver: a directory; the first trial that claims it kills its own
# worker process (os._exit) right after its first checkpoint, as a lost worker would die.
CRASH_ENV = "MMSSL_TUNE_INJECT_CRASH"


def trial_device() -> str:
    """"cuda" when Ray gave this trial a GPU (it is then the only visible one), else "cpu"."""
    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def placement() -> dict[str, str]:
    """Where this trial/task runs: ``trial/node_id`` (Ray node id) and ``trial/device``."""
    device = trial_device()
    gpus = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
    if gpus:  # "cpu (GPU ids [..])": Ray assigned a GPU but CUDA is not available here
        device = f"{device} (GPU ids {gpus})"
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    return {NODE_KEY: node, DEVICE_KEY: device}


class Tracker:
    """Follows fit's selected epoch (strict improvements of ``best/val/recall@20``)."""

    def __init__(self, metric: str):
        self.metric = metric
        self.best_select = float("-inf")
        self.best_epoch = 0
        self.best_value = float("nan")
        self.last: dict[str, Any] | None = None

    def update(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """The report for this epoch: fit's metrics + ``best/<metric>`` + ``best/epoch``."""
        out: dict[str, Any] = {k: (int(v) if k == "epoch" else float(v)) for k, v in metrics.items()}
        out["epoch"] = int(epoch)
        best_select = out.get(f"best/{SELECT}", out.get(SELECT, float("nan")))
        if best_select > self.best_select:  # NaN compares False: never selected
            self.best_select, self.best_epoch = best_select, int(epoch)
            self.best_value = out.get(self.metric, float("nan"))
        out[f"best/{self.metric}"] = self.best_value
        out["best/epoch"] = self.best_epoch
        self.last = out
        return out

    def save(self, directory: str | Path) -> None:
        state = {k: getattr(self, k) for k in ("best_select", "best_epoch", "best_value", "last")}
        Path(directory, STATE_FILE).write_text(jsonio.dumps(state, why="-inf/nan: no epoch selected yet"))

    def load(self, directory: str | Path) -> None:
        path = Path(directory, STATE_FILE)
        if path.is_file():
            for k, v in jsonio.loads(path.read_text()).items():
                setattr(self, k, v)


def train_mmssl(params: dict[str, Any], *, data: Dataset, base: dict[str, Any], metric: str,
                checkpoint_every: int, cpus_per_trial: float, fault_dir: str | None = None,
                crash_dir: str | None = None) -> None:
    """Tune function trainable: ``params`` (sampled) on top of ``base`` (the space's fixed part).

    ``fault_dir`` is a testing hook (the driver's ``$MMSSL_TUNE_INJECT_DIVERGENCE``): the
    first trial to claim it raises DivergedError at epoch 1. ``crash_dir``
    (``$MMSSL_TUNE_INJECT_CRASH``): the first trial to claim it kills its worker process
    at epoch ``checkpoint_every + 1``.
    """
    torch.set_num_threads(max(1, int(cpus_per_trial)))
    cfg = Config.from_dict({**base, **params, "device": trial_device()})
    tracker = Tracker(metric)
    fault_epoch = _claim_fault(fault_dir)
    crash_epoch = checkpoint_every + 1 if fault_epoch is None and _claim_fault(crash_dir) else None
    sent_finished = False
    where = placement()

    def on_epoch(epoch: int, metrics: dict[str, Any], save_checkpoint) -> None:
        nonlocal sent_finished
        if epoch == fault_epoch:
            raise DivergedError(epoch, "train/loss", float("nan"))
        if epoch == crash_epoch:
            os._exit(1)  # testing hook: the worker process dies
        report = {**tracker.update(epoch, metrics), **where}
        finished = epoch >= cfg.epochs
        report[FINISHED_KEY] = float(finished)
        if not finished and epoch % checkpoint_every == 0:
            with tempfile.TemporaryDirectory(prefix="mmssl-ckpt-") as tmp:
                save_checkpoint(tmp)
                tracker.save(tmp)
                tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))
        else:
            tune.report(report)
        sent_finished = finished

    try:
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                tracker.load(directory)
                fit(cfg, data, on_epoch=on_epoch, resume_from=directory)
        else:
            fit(cfg, data, on_epoch=on_epoch)
    except DivergedError as e:  # a result: reported and returned, so Tune does not retry it
        last = tracker.last or {"epoch": 0, f"best/{metric}": float("nan"), "best/epoch": 0}
        tune.report({**last, **where, "epoch": e.epoch, FINISHED_KEY: 0.0, DIVERGED_KEY: 1.0,
                     REASON_KEY: f"DivergedError: {e}"})
        return
    if not sent_finished and tracker.last is not None:
        # fit stopped itself (patience): say so, repeating the last epoch's values
        tune.report({**tracker.last, **where, FINISHED_KEY: 1.0})


def _claim_fault(directory: str | None) -> int | None:
    """The testing hook: epoch 1 (before any report, so ASHA cannot stop it first) for the one
    trial that claims ``directory``."""
    if not directory:
        return None
    try:
        fd = os.open(os.path.join(directory, "claimed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except OSError:
        return None
    os.close(fd)
    return 1


def run_final_seed(config: dict[str, Any], data: Dataset, cpus: float) -> dict[str, Any]:
    """One final re-training (a Ray task): fit at full budget, test evaluated once at the best epoch."""
    torch.set_num_threads(max(1, int(cpus)))
    cfg = Config.from_dict({**config, "device": trial_device()})
    try:
        result = fit(cfg, data)
    except DivergedError as e:
        return {"seed": cfg.seed, "error": str(e)}
    result = {k: v for k, v in result.items() if k != "config"}
    result["seed"] = cfg.seed
    result.update(placement())
    return result


def run_fit_job(config: dict[str, Any], data: Dataset, cpus: float, per_user: bool = False) -> dict[str, Any]:
    """One job of :func:`tune.runner.run_fits` (a Ray task): ``fit`` with validation selection,
    test evaluated once at the best epoch.

    Returns fit's result without ``config`` plus ``status`` ("ok"), ``reason`` ("") and, with
    ``per_user``, ``per_user`` (fit's dict of per-user test arrays). A diverged run returns
    ``{"status": "failed", "reason": <one line>, "diverged": True, "seconds": ...}``; any other
    exception propagates (Ray wraps it in a ``RayTaskError``).
    """
    import time

    torch.set_num_threads(max(1, int(cpus)))
    cfg = Config.from_dict({**config, "device": trial_device()})
    t0 = time.perf_counter()
    try:
        result = fit(cfg, data, per_user=per_user)
    except DivergedError as e:
        return {"status": "failed", "reason": str(e), "diverged": True, "seconds": time.perf_counter() - t0}
    result.pop("config", None)
    result.update(status="ok", reason="")
    return result
