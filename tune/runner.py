"""Ray plumbing shared by the search CLI and anything else that launches runs.

* :func:`init_ray` starts a private local Ray (short ``/tmp/mmssl-ray-*`` temp dir,
  no dashboard; socket paths over ~100 bytes fail) or connects to ``--address``;
  it never runs ``ray stop`` and shuts down only what it started.
* :func:`make_tuner` builds the Tuner: the trainable (data shared once through
  ``tune.with_parameters``, resources per trial), the prune-aware Optuna searcher
  with its study in ``OUT/NAME/study.db``, and ASHA on ``time_attr="epoch"``.
  :func:`restore_tuner` continues an interrupted experiment from its folder.
* :func:`run_final` re-trains one configuration with several seeds as Ray tasks.
* :func:`run_fits` runs any list of (key, data set, config) jobs as Ray tasks with a per-key
  result cache, per-user test metrics on request and a progress callback (ablation, sweeps).
* :class:`Progress` prints one terse line per trial start/end and a heartbeat.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import ray
from ray import cloudpickle, tune
from ray.tune.schedulers import ASHAScheduler

from mmssl.data import Dataset
from tune.fits import FitJob, config_hash, data_fingerprint, job_key, print_progress, run_fits  # noqa: F401 (API)
from tune.searcher import FINISHED_KEY, PruneAwareOptunaSearch
from tune.space import Space
from tune.trainable import FAULT_ENV, run_final_seed, train_mmssl

REPO = Path(__file__).resolve().parents[1]
STUDY_FILE = "study.db"
STUDY_NAME = "mmssl"


@contextmanager
def ray_session(num_cpus: int | None = None, address: str | None = None) -> Iterator[None]:
    """Ray for the duration of the block: reuse a running one, else start (and later stop) our own."""
    started, temp_dir = init_ray(num_cpus=num_cpus, address=address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
            if temp_dir:
                shutil.rmtree(temp_dir, ignore_errors=True)


def init_ray(num_cpus: int | None = None, address: str | None = None) -> tuple[bool, str | None]:
    """Start or join Ray; returns (started_here, private temp dir or None)."""
    # Trial workers import ``tune.trainable`` and ``mmssl``: put the repository on their path.
    paths = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if ray.is_initialized():
        return False, None
    if address:
        ray.init(address=address, log_to_driver=False,
                 runtime_env={"py_modules": [str(REPO / "mmssl"), str(REPO / "tune")]})
        return True, None
    temp_dir = tempfile.mkdtemp(prefix="mmssl-ray-", dir="/tmp")
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=temp_dir,
             log_to_driver=False, configure_logging=True, logging_level="warning")
    return True, temp_dir


def trainable_for(space: Space, data: Dataset):
    """The trial function with its parameters and resources bound."""
    fn = tune.with_parameters(train_mmssl, data=data, base=space.base_config(), metric=space.metric,
                              checkpoint_every=space.checkpoint_every, cpus_per_trial=space.cpus_per_trial,
                              fault_dir=os.environ.get(FAULT_ENV) or None)
    return tune.with_resources(fn, {"cpu": space.cpus_per_trial, "gpu": space.gpus_per_trial})


def objective_key(space: Space) -> str:
    return f"best/{space.metric}"


def make_tuner(space: Space, data: Dataset, exp_dir: Path, callbacks=()) -> tuple[tune.Tuner, PruneAwareOptunaSearch]:
    """A fresh Tuner writing to ``exp_dir`` (= storage_path / name)."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    _quiet_tune()
    searcher = PruneAwareOptunaSearch(space.optuna_space(), metric=objective_key(space), mode="max",
                                      seed=space.seed, storage_path=exp_dir / STUDY_FILE,
                                      study_name=STUDY_NAME, n_startup_trials=space.n_startup_trials)
    scheduler = ASHAScheduler(time_attr="epoch", metric=objective_key(space), mode="max",
                              max_t=space.max_epochs, grace_period=space.grace_period,
                              reduction_factor=space.reduction_factor)
    tuner = tune.Tuner(
        trainable_for(space, data),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=space.num_samples,
                                    max_concurrent_trials=min(space.max_concurrent, space.num_samples),
                                    reuse_actors=True, trial_dirname_creator=_trial_dirname),
        run_config=run_config(exp_dir, callbacks),
    )
    return tuner, searcher


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _quiet_tune() -> None:
    # num_to_keep=1 forces an experiment snapshot per trial checkpoint; Tune warns about it every time
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no tables; Progress prints instead
    # a failed trial's traceback goes to its error.txt; Progress prints the one-line reason
    logging.getLogger("ray.tune.execution.tune_controller").setLevel(logging.CRITICAL)


def run_config(exp_dir: Path, callbacks=()) -> tune.RunConfig:
    return tune.RunConfig(
        name=exp_dir.name, storage_path=str(exp_dir.parent.resolve()), verbose=0,
        callbacks=list(callbacks),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
    )


def restore_tuner(space: Space, data: Dataset, exp_dir: Path) -> tune.Tuner:
    """Continue the experiment in ``exp_dir``: finished trials kept, unfinished ones resumed
    from their checkpoints, the Optuna study reopened from ``exp_dir/study.db``.

    Errored trials are NOT re-run: a diverged trial is a result (told to Optuna as FAIL).
    """
    _quiet_tune()
    PruneAwareOptunaSearch.study_path_on_restore = str(exp_dir / STUDY_FILE)
    return tune.Tuner.restore(str(exp_dir.resolve()), trainable=trainable_for(space, data),
                              resume_unfinished=True, resume_errored=False, restart_errored=False)


def run_final(space: Space, config: dict[str, Any], data: Dataset, cache_dir: Path) -> list[dict[str, Any]]:
    """Re-train ``config`` once per ``space.final_seeds`` (Ray tasks, in parallel as resources
    allow); each run's test split is evaluated once, at its best validation epoch.

    Finished seeds are cached in ``cache_dir/seed_<s>.json`` and not re-run on ``--resume``.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    task = ray.remote(num_cpus=space.cpus_per_trial, num_gpus=space.gpus_per_trial)(run_final_seed)
    data_ref = None
    pending, done = {}, {}
    for seed in space.final_seeds:
        cfg = {**config, "seed": int(seed)}
        path = cache_dir / f"seed_{seed}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("config") == cfg:
                done[seed] = cached["result"]
                continue
        data_ref = data_ref if data_ref is not None else ray.put(data)
        pending[seed] = (task.remote(cfg, data_ref, space.cpus_per_trial), cfg)
    for seed, (ref, cfg) in pending.items():
        result = ray.get(ref)
        (cache_dir / f"seed_{seed}.json").write_text(json.dumps({"config": cfg, "result": result}, indent=1))
        done[seed] = result
        outcome = result.get("error") or f"test/recall@20 {result.get('test/recall@20', float('nan')):.4f}"
        print(f"final seed {seed}: {outcome}", flush=True)
    return [done[s] for s in space.final_seeds]


class Progress(tune.Callback):
    """Terse live progress: one line per trial start and end, a heartbeat every ``every_s``."""

    def __init__(self, space: Space, every_s: float = 60.0, out=None):
        self.space, self.every_s, self.out = space, every_s, out  # out None = sys.stdout (picklable)
        self.setup()

    def setup(self, **info):
        self.t0 = self.last_beat = time.time()
        self.finished, self.best = 0, float("-inf")

    def _print(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.0f}s] {msg}", file=self.out or sys.stdout, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        params = " ".join(f"{k}={_short(v)}" for k, v in sorted(trial.config.items()))
        self._print(f"start  {trial.trial_id}  {params}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        value = _flat_get(last, f"best/{self.space.metric}")
        status = "completed" if last.get(FINISHED_KEY) else "stopped_early"
        self._end(trial, f"{status} at epoch {last.get('epoch', 0)}, best {self.space.metric} {_short(value)}", value)

    def on_trial_error(self, iteration, trials, trial, **info):
        error = None
        try:  # the local copies: the storage copy may not be synced yet
            if trial.pickled_error_file and os.path.exists(trial.pickled_error_file):
                with open(trial.pickled_error_file, "rb") as fh:
                    error = cloudpickle.load(fh)
            elif trial.error_file and os.path.exists(trial.error_file):
                error = Path(trial.error_file).read_text()
        except Exception:  # noqa: BLE001 - progress output must never break the run
            pass
        self._end(trial, f"failed: {failure_reason(error) or 'error'} (traceback: {trial.path}/error.txt)", None)

    def _end(self, trial, what: str, value) -> None:
        self.finished += 1
        if value is not None and math.isfinite(value):
            self.best = max(self.best, value)
        self._print(f"end    {trial.trial_id}  {what}  [{self.finished}/{self.space.num_samples} done, "
                    f"best so far {_short(self.best)}]")

    def on_step(self, iteration, trials, **info):
        if time.time() - self.last_beat >= self.every_s:
            self.last_beat = time.time()
            running = sum(t.status == "RUNNING" for t in trials)
            self._print(f"...    {running} running, {self.finished}/{self.space.num_samples} done, "
                        f"best so far {_short(self.best)}")


def failure_reason(error: Any) -> str:
    """One line from a Ray trial error: the innermost exception's ``Type: message``."""
    if error is None:
        return ""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return head.rsplit(".", 1)[-1] + ln[len(head):]
    return lines[-1] if lines else type(error).__name__


def _flat_get(d: dict, key: str) -> Any:
    if key in d:
        return d[key]
    for part in key.split("/"):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _short(v: Any) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
