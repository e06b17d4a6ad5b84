"""Ray plumbing shared by the search CLI and anything else that launches runs.

* :func:`init_ray` starts a private local Ray (short ``/tmp/mmssl-ray-*`` temp dir,
  no dashboard; socket paths over ~100 bytes fail) or joins the cluster at ``--address``
  / ``$RAY_ADDRESS``; without an address it never attaches to a running cluster. It
  never runs ``ray stop``, shuts down only what it started, and first clears the temp
  roots that a killed earlier run left behind (``tune.tempdirs``).
* :func:`check_resources` refuses, before any trial starts, a per-trial request no
  node of the cluster can hold (Ray would otherwise wait forever).
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

import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import ray
from ray import cloudpickle, tune
from ray.tune.schedulers import ASHAScheduler

from mmssl import jsonio
from mmssl.data import Dataset
from mmssl.errors import ConfigError
from mmssl.fingerprint import check_same_data
from tune.fits import FitJob, config_hash, data_fingerprint, job_key, print_progress, run_fits  # noqa: F401 (API)
from tune.searcher import DIVERGED_KEY, FINISHED_KEY, REASON_KEY, PruneAwareOptunaSearch, ResumableLimiter
from tune.space import Space
from tune.state import mark_failed_trials, trial_dirname_of, tune_trial_ids
from tune.tempdirs import DRIVER_PID_FILE, ROOT_ENV, TEMP_PREFIX, TEMP_ROOT, clean_stale_temp_roots
from tune.trainable import CRASH_ENV, FAULT_ENV, run_final_seed, train_mmssl

REPO = Path(__file__).resolve().parents[1]
STUDY_FILE = "study.db"
STUDY_NAME = "mmssl"


@contextmanager
def ray_session(num_cpus: int | None = None, address: str | None = None) -> Iterator[None]:
    """Ray for the duration of the block: reuse a running one, else start (and later stop) our own.

    The private temp dir is removed on exit, error, Ctrl-C and SIGTERM (which acts as
    Ctrl-C inside, also during the shutdown: ``mmssl.cli.sigterm_to_interrupt``; Ray's own
    handler, a bare ``sys.exit``, is never left in place); after a SIGKILL the next
    :func:`init_ray` removes it (and any process still holding it).
    """
    import signal
    import threading

    from mmssl.cli import sigterm_to_interrupt

    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main_thread else None
    started, temp_dir = init_ray(num_cpus=num_cpus, address=address)
    if main_thread:  # ray.init made SIGTERM a bare sys.exit of the driver (runs killed, no resume hint)
        signal.signal(signal.SIGTERM, sigterm_to_interrupt)
    try:
        yield
    finally:
        try:
            if started:
                try:
                    ray.shutdown()
                finally:
                    if temp_dir:
                        shutil.rmtree(temp_dir, ignore_errors=True)
        finally:
            if main_thread:  # the handler from before ray.init, not Ray's
                signal.signal(signal.SIGTERM, before)


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join: ``address``, else ``$RAY_ADDRESS``, else None (= a private local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def init_ray(num_cpus: int | None = None, address: str | None = None) -> tuple[bool, str | None]:
    """Start or join Ray; returns (started_here, private temp dir or None).

    ``address`` (or ``$RAY_ADDRESS``): join that cluster (``ray start --head`` address,
    ``auto``, or ``ray://host:10001``). None: start a private local Ray with
    ``address="local"``, so that a cluster already running on this machine is never
    joined by accident (plain ``ray.init()`` would). Raises ``ConnectionError`` (Ray's)
    when the cluster cannot be reached.
    """
    # Trial workers import ``tune.trainable`` and ``mmssl``: put the repository on their path.
    paths = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if ray.is_initialized():
        return False, None
    address = cluster_address(address)
    if address:
        ray.init(address=address, log_to_driver=False,
                 runtime_env={"py_modules": [str(REPO / "mmssl"), str(REPO / "tune")]})
        return True, None
    clean_stale_temp_roots()
    temp_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=TEMP_ROOT)
    Path(temp_dir, DRIVER_PID_FILE).write_text(str(os.getpid()))
    os.environ[ROOT_ENV] = temp_dir  # inherited by every Ray process: a later run finds a killed run's stragglers
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=temp_dir,
             log_to_driver=False, configure_logging=True, logging_level="warning")
    return True, temp_dir


def check_resources(cpus_per_trial: float, gpus_per_trial: float, nodes: list[dict] | None = None,
                    unit: str = "trial") -> None:
    """Refuse a per-trial request that no single node can hold, before any trial starts.

    ``nodes``: Ray's ``ray.nodes()`` (default: the connected cluster's); dead nodes are
    ignored. Ray would otherwise keep such a trial PENDING forever. GPUs count as Ray
    sees them (a node's ``GPU`` resource), so a fake ``num_gpus`` resource counts too.
    ``unit``: "trial" (the search) or "run" (``run_fits``: ablation, sweeps) names the flags.

    Raises:
        ConfigError: GPUs requested and no node has one; ``gpus_per_trial`` above the
            GPUs of the largest node; ``cpus_per_trial`` above the CPUs of the largest node.
    """
    nodes = ray.nodes() if nodes is None else nodes
    alive = [n.get("Resources") or {} for n in nodes if n.get("Alive", n.get("alive", True))]
    max_gpu = max((r.get("GPU", 0.0) for r in alive), default=0.0)
    max_cpu = max((r.get("CPU", 0.0) for r in alive), default=0.0)
    where = f"the Ray cluster ({len(alive)} node{'s' if len(alive) != 1 else ''})"
    if gpus_per_trial > 0 and max_gpu == 0:
        raise ConfigError(f"--gpus-per-{unit} {gpus_per_trial:g}: {where} has no GPU; use --gpus-per-{unit} 0")
    if gpus_per_trial > max_gpu:
        raise ConfigError(f"--gpus-per-{unit} {gpus_per_trial:g}: the largest node of {where} has "
                          f"{max_gpu:g} GPU(s); a trial runs on one node")
    if cpus_per_trial > max_cpu:
        raise ConfigError(f"--cpus-per-{unit} {cpus_per_trial:g}: the largest node of {where} has "
                          f"{max_cpu:g} CPU(s); a trial runs on one node")


def trainable_for(space: Space, data: Dataset):
    """The trial function with its parameters and resources bound."""
    fn = tune.with_parameters(train_mmssl, data=data, base=space.base_config(), metric=space.metric,
                              checkpoint_every=space.checkpoint_every, cpus_per_trial=space.cpus_per_trial,
                              fault_dir=os.environ.get(FAULT_ENV) or None,
                              crash_dir=os.environ.get(CRASH_ENV) or None)
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
        tune_config=tune.TuneConfig(search_alg=ResumableLimiter(searcher, min(space.max_concurrent, space.num_samples)),
                                    scheduler=scheduler, num_samples=space.num_samples,
                                    reuse_actors=True, trial_dirname_creator=_trial_dirname),
        run_config=run_config(exp_dir, callbacks, max_failures=space.max_failures),
    )
    return tuner, searcher


def _trial_dirname(trial) -> str:
    return trial_dirname_of(trial.trial_id)


def _quiet_tune() -> None:
    # num_to_keep=1 forces an experiment snapshot per trial checkpoint; Tune warns about it every time
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no tables; Progress prints instead
    # a failed trial's traceback goes to its error.txt; Progress prints the one-line reason
    logging.getLogger("ray.tune.execution.tune_controller").setLevel(logging.CRITICAL)
    # ASHA takes a percentile over a rung whose values are all NaN while a trial has not yet
    # selected an epoch (or diverged); numpy's warning about it is noise on the console
    warnings.filterwarnings("ignore", message="All-NaN slice encountered", category=RuntimeWarning)


def run_config(exp_dir: Path, callbacks=(), max_failures: int = 2) -> tune.RunConfig:
    """Tune's RunConfig: storage ``exp_dir``, last checkpoint kept, and ``max_failures``
    retries of a trial whose worker process or node died, each from its last checkpoint
    (``FailureConfig``; a diverged trial is not an error and is never retried)."""
    return tune.RunConfig(
        name=exp_dir.name, storage_path=str(exp_dir.parent.resolve()), verbose=0,
        callbacks=list(callbacks),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=max_failures, fail_fast=False),
    )


def restore_tuner(space: Space, data: Dataset, exp_dir: Path, retry_failed: bool = False) -> tune.Tuner:
    """Continue the experiment in ``exp_dir``: finished trials kept, unfinished ones resumed
    from their checkpoints, the Optuna study reopened from ``exp_dir/study.db``.

    Errored trials (worker/node lost beyond ``max_failures``, out of memory, a crash) are
    re-run from their last checkpoint only with ``retry_failed``; a diverged trial is a
    result, not an error (it ended TERMINATED, told to Optuna as FAIL) and is never re-run.
    """
    _quiet_tune()
    mark_failed_trials(exp_dir, exp_dir / STUDY_FILE, STUDY_NAME)
    PruneAwareOptunaSearch.study_path_on_restore = str(exp_dir / STUDY_FILE)
    PruneAwareOptunaSearch.tune_trials_on_restore = tune_trial_ids(exp_dir)
    return tune.Tuner.restore(str(exp_dir.resolve()), trainable=trainable_for(space, data),
                              resume_unfinished=True, resume_errored=retry_failed, restart_errored=False)


def run_final(space: Space, config: dict[str, Any], data: Dataset, cache_dir: Path,
              data_fp: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Re-train ``config`` once per ``space.final_seeds`` (Ray tasks, in parallel as resources
    allow); each run's test split is evaluated once, at its best validation epoch.

    Finished seeds are cached in ``cache_dir/seed_<s>.json`` (with the data's fingerprint)
    and not re-run on ``--resume``; a cached seed of the same config on other data raises
    :class:`mmssl.errors.DataError` naming what changed.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    task = ray.remote(num_cpus=space.cpus_per_trial, num_gpus=space.gpus_per_trial)(run_final_seed)
    data_ref = None
    pending, done = {}, {}
    for seed in space.final_seeds:
        cfg = {**config, "seed": int(seed)}
        path = cache_dir / f"seed_{seed}.json"
        if path.is_file():
            cached = jsonio.loads(path.read_text())
            if cached.get("config") == cfg and data_fp is not None:
                check_same_data(cached.get("data_fingerprint"), data_fp, str(path))
            if cached.get("config") == cfg:
                done[seed] = cached["result"]
                continue
        data_ref = data_ref if data_ref is not None else ray.put(data)
        pending[seed] = (task.remote(cfg, data_ref, space.cpus_per_trial), cfg)
    for seed, (ref, cfg) in pending.items():
        result = ray.get(ref)
        (cache_dir / f"seed_{seed}.json").write_text(jsonio.dumps(
            {"config": cfg, "data_fingerprint": data_fp, "result": result}, indent=1))
        done[seed] = result
        outcome = result.get("error") or f"test/recall@20 {result.get('test/recall@20', float('nan')):.4f}"
        print(f"final seed {seed}: {outcome}", flush=True)
    return [done[s] for s in space.final_seeds]


class Progress(tune.Callback):
    """Terse live progress: one line per trial start, retry and end, a heartbeat every ``every_s``.

    The ``[k/N done`` count includes trials that had ended before a ``--resume``.
    """

    def __init__(self, space: Space, every_s: float = 60.0, out=None):
        self.space, self.every_s, self.out = space, every_s, out  # out None = sys.stdout (picklable)
        self.setup()

    def setup(self, **info):
        self.t0 = self.last_beat = time.time()
        self.ended: set[str] = set()
        self.best = float("-inf")

    @property
    def finished(self) -> int:
        return len(self.ended)

    def _print(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.0f}s] {msg}", file=self.out or sys.stdout, flush=True)

    def _count_ended(self, trials) -> None:
        """Trials already ended (restored ones included), and their best objective."""
        for t in trials:
            if t.status in ("TERMINATED", "ERROR") and t.trial_id not in self.ended:
                self.ended.add(t.trial_id)
                value = _flat_get(t.last_result or {}, f"best/{self.space.metric}")
                if t.status == "TERMINATED" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.best = max(self.best, value)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._count_ended(trials)
        params = " ".join(f"{k}={_short(v)}" for k, v in sorted(trial.config.items()))
        self._print(f"start  {trial.trial_id}  {params}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._print(f"retry  {trial.trial_id}  after {failure_reason(_trial_error(trial)) or 'an error'} "
                    f"(failure {trial.run_metadata.num_failures} of at most {trial.max_failures}; "
                    f"from its last checkpoint)")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._count_ended(trials)
        last = trial.last_result or {}
        value = _flat_get(last, f"best/{self.space.metric}")
        if last.get(DIVERGED_KEY):
            self._end(trial, f"failed: {last.get(REASON_KEY, 'diverged')}", None)
            return
        status = "completed" if last.get(FINISHED_KEY) else "stopped_early"
        self._end(trial, f"{status} at epoch {last.get('epoch', 0)}, best {self.space.metric} {_short(value)}", value)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._count_ended(trials)
        reason = failure_reason(_trial_error(trial)) or "error"
        self._end(trial, f"failed: {reason} (traceback: {trial.path}/error.txt)", None)

    def _end(self, trial, what: str, value) -> None:
        self.ended.add(trial.trial_id)
        if value is not None and math.isfinite(value):
            self.best = max(self.best, value)
        self._print(f"end    {trial.trial_id}  {what}  [{self.finished}/{self.space.num_samples} done, "
                    f"best so far {_short(self.best)}]")

    def on_step(self, iteration, trials, **info):
        if time.time() - self.last_beat >= self.every_s:
            self._count_ended(trials)
            self.last_beat = time.time()
            running = sum(t.status == "RUNNING" for t in trials)
            self._print(f"...    {running} running, {self.finished}/{self.space.num_samples} done, "
                        f"best so far {_short(self.best)}")


def _trial_error(trial) -> Any:
    """A trial's last error from its local files (the storage copy may not be synced yet)."""
    try:
        if trial.pickled_error_file and os.path.exists(trial.pickled_error_file):
            with open(trial.pickled_error_file, "rb") as fh:
                return cloudpickle.load(fh)
        if trial.error_file and os.path.exists(trial.error_file):
            return Path(trial.error_file).read_text()
    except Exception:  # noqa: BLE001 - progress output must never break the run
        pass
    return None


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


@contextmanager
def ray_console_to(log_file: Path) -> Iterator[Any]:
    """Ray's own console messages go to ``log_file`` for the duration of the block.

    Ray logs through Python's ``logging`` under ``ray`` with handlers that write to
    the console: the token-authentication warning at ``ray.init``, ``Trials did not
    complete: [...]`` after a failed trial (already in the summary). Their streams are
    pointed at ``log_file`` now and by calling the yielded function again after
    ``ray.init`` (which may add handlers); the previous streams come back on exit.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log_file, "a", buffering=1)
    saved: list[tuple[logging.StreamHandler, Any]] = []

    def route() -> None:
        names = ["ray"] + [n for n in logging.root.manager.loggerDict if n.startswith("ray.")]
        for name in names:
            logger = logging.getLogger(name)
            for h in logger.handlers:
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                        and h.stream is not fh:
                    saved.append((h, h.setStream(fh)))

    route()
    try:
        yield route
    finally:
        for h, old in reversed(saved):
            h.setStream(old)
        fh.close()
