"""Generic runs for the analysis layer: any list of ``fit`` jobs as Ray tasks, with a result cache.

:func:`run_fits` (re-exported by :mod:`tune.runner`, import it from there) runs
(key, data set, config, per_user) jobs as Ray tasks inside the one Ray set-up of
``tune.runner.ray_session``; each job is ``mmssl.train.fit`` with validation selection and
test evaluated once. Results are cached per key so that re-running skips finished runs;
a progress callback gets one call per finished run. Used by ``analysis/ablation.py`` and
the sensitivity sweeps.

    from tune.runner import FitJob, job_key, ray_session, run_fits
    jobs = [FitJob(job_key("synthetic", "full", s, cfg), "synthetic", {**cfg, "seed": s}, True) for s in (1, 2)]
    with ray_session(num_cpus=2):
        results = run_fits(jobs, {"synthetic": data}, "runs/x/cache", cpus_per_run=1)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import pandas as pd
import ray

from mmssl.data import Dataset
from mmssl.fingerprint import fingerprint

class FitJob(NamedTuple):
    """One run for :func:`run_fits`.

    key: unique, file-name-safe id of the run (see :func:`job_key`); its cache file is
    ``cache_dir/<key>.json``. dataset: a name in ``run_fits``'s ``datasets`` mapping.
    config: the resolved config dict (``Config.to_dict()`` style; ``device`` is set by the
    task from Ray's GPU assignment). per_user: also return the per-user test metrics.
    """

    key: str
    dataset: str
    config: dict[str, Any]
    per_user: bool = False


def config_hash(config: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over the config's canonical JSON (sorted keys); ``device`` ignored."""
    canon = json.dumps({k: v for k, v in config.items() if k != "device"}, sort_keys=True, default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def job_key(dataset: str, tag: str, seed: int, config: dict[str, Any]) -> str:
    """``<dataset>__<tag>__seed<seed>__<config_hash[:10]>`` with every character outside
    ``[A-Za-z0-9._-]`` replaced by ``_`` (e.g. ``tiktok__w_o_ASL__seed1__3f2a...``)."""
    raw = f"{dataset}__{tag}__seed{int(seed)}__{config_hash(config)[:10]}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", raw)


def data_fingerprint(data: Dataset) -> str:
    """16 hex digits of SHA-256 over :func:`mmssl.fingerprint.fingerprint` (per split and per
    feature file: shape and content hash): identical data give identical fingerprints."""
    canon = json.dumps(fingerprint(data), sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


OnResult = Callable[[dict[str, Any], int, int, "float | None"], None]


def run_fits(jobs: Sequence[FitJob | tuple], datasets: dict[str, Dataset], cache_dir: str | Path, *,
             cpus_per_run: float = 1, gpus_per_run: float = 0, max_concurrent: int | None = None,
             on_result: OnResult | None = None, retry_failed: bool = False) -> list[dict[str, Any]]:
    """Run ``jobs`` as Ray tasks (``mmssl.train.fit`` each: validation selection, test once at
    the best epoch), cached per key so that calling again skips finished runs.

    Args:
        jobs: :class:`FitJob` or ``(key, dataset name, config dict, per_user)`` tuples; keys unique.
        datasets: dataset name -> :class:`mmssl.data.Dataset`; each is put in Ray's object
            store once, and only if one of its jobs has to run.
        cache_dir: folder of the cache (created). Per job ``<key>.json`` (the record:
            ``key``, ``dataset``, ``config_hash``, ``data_fingerprint``, ``config``, ``result``)
            and, for per-user jobs, ``<key>.per_user.parquet``. A record is reused only when
            its config hash and data fingerprint match the job's; otherwise the job runs again
            and the record is replaced. Files are written atomically as each run finishes, so
            an interrupted call (Ctrl-C, killed driver) loses only the runs in flight.
        cpus_per_run / gpus_per_run: Ray resources of one task (fractions share a GPU);
            torch uses ``int(cpus_per_run)`` threads (at least 1).
        max_concurrent: tasks in flight at once (None: as many as Ray's resources allow).
        on_result: called once per job run in this call (not for cached ones) as
            ``on_result(result, n_done, n_total, eta_s)``: ``n_done`` counts cached runs too;
            ``eta_s`` (seconds, None before the first run finishes) = runs left / throughput
            of this call. Default :func:`print_progress` (one line per run); pass
            ``lambda *a: None`` for silence.
        retry_failed: re-run jobs whose cached record is a (diverged) failure.

    Returns:
        One dict per job, in the order of ``jobs``: ``key``, ``dataset``, ``status`` ("ok" or
        "failed"), ``reason`` (one line, "" when ok), ``cached`` (bool), ``config`` (the job's),
        ``seconds`` (the run's wall time, float), and for ok runs ``best_epoch``,
        ``epochs_run``, ``stopped_early`` and every ``val/*`` and ``test/*`` metric (floats;
        NaN when the split has no users), plus ``per_user``: a ``pandas.DataFrame`` with
        columns ``user`` (int64) and each ``test/<metric>@<K>`` (float64), one row per
        evaluated test user, whose column means are the ``test/*`` values (None when
        ``per_user`` was not asked or the run failed).

    Failures: a diverged run (``DivergedError``) is a result: status "failed" with its
    one-line reason, cached. Any other error of a task (exception, worker killed) gives
    status "failed" with :func:`failure_reason`'s line and is NOT cached, so calling again
    retries it. The other jobs go on in both cases.

    Raises:
        ValueError: duplicated keys, a dataset name missing from ``datasets``, or a bad
            ``max_concurrent``/resource value.
        ConfigError: no node of the cluster can hold one run's CPUs/GPUs (Ray would wait forever).
        RuntimeError: jobs have to run but Ray is not initialised (use :func:`ray_session`
            or :func:`init_ray`: there is no second Ray set-up).
        KeyboardInterrupt: re-raised after cancelling the tasks in flight (finished runs
            are already cached).
    """
    from tune.runner import failure_reason
    from tune.trainable import run_fit_job

    jobs = [j if isinstance(j, FitJob) else FitJob(*j) for j in jobs]
    keys = [j.key for j in jobs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"run_fits: duplicated job keys: {', '.join(dup)}")
    missing = sorted({j.dataset for j in jobs} - set(datasets))
    if missing:
        raise ValueError(f"run_fits: unknown dataset name(s): {', '.join(missing)}")
    if max_concurrent is not None and max_concurrent < 1:
        raise ValueError(f"run_fits: max_concurrent must be >= 1, got {max_concurrent}")
    if cpus_per_run <= 0 or gpus_per_run < 0:
        raise ValueError(f"run_fits: bad resources cpus_per_run={cpus_per_run}, gpus_per_run={gpus_per_run}")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    on_result = print_progress if on_result is None else on_result
    prints = {name: data_fingerprint(datasets[name]) for name in {j.dataset for j in jobs}}

    results: dict[str, dict[str, Any]] = {}
    todo: list[FitJob] = []
    for job in jobs:
        cached = _read_cached(cache, job, prints[job.dataset])
        if cached is not None and (cached["status"] == "ok" or not retry_failed):
            results[job.key] = cached
        else:
            todo.append(job)
    if not todo:
        return [results[k] for k in keys]
    if not ray.is_initialized():
        raise RuntimeError("run_fits: Ray is not initialised; call it inside tune.runner.ray_session()")
    from tune.runner import check_resources  # here: tune.runner re-exports this module

    check_resources(cpus_per_run, gpus_per_run, unit="run")  # Ray would otherwise wait forever

    task = ray.remote(run_fit_job).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)
    refs: dict[str, Any] = {}
    in_flight: dict[Any, FitJob] = {}
    queue, n_total, t0, n_new = list(todo), len(jobs), time.time(), 0
    limit = max_concurrent or len(queue)
    try:
        while queue or in_flight:
            while queue and len(in_flight) < limit:
                job = queue.pop(0)
                if job.dataset not in refs:
                    refs[job.dataset] = ray.put(datasets[job.dataset])
                in_flight[task.remote(job.config, refs[job.dataset], cpus_per_run, job.per_user)] = job
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            job = in_flight.pop(ready[0])
            try:
                raw = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - a crashed run is a recorded result
                raw = {"status": "failed", "reason": failure_reason(e) or type(e).__name__, "seconds": float("nan")}
            result = _finish(cache, job, raw, prints[job.dataset])
            results[job.key] = result
            n_new += 1
            n_left = len(queue) + len(in_flight)
            eta = n_left * (time.time() - t0) / n_new
            on_result(result, n_total - n_left, n_total, eta)
    except KeyboardInterrupt:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        raise
    return [results[k] for k in keys]


def print_progress(result: dict[str, Any], n_done: int, n_total: int, eta_s: float | None) -> None:
    """The default ``on_result`` of :func:`run_fits`: one line per finished run."""
    if result["status"] == "ok":
        what = (f"ok  test/recall@20 {result.get('test/recall@20', float('nan')):.4f}  "
                f"best epoch {result.get('best_epoch')}/{result.get('epochs_run')}")
    else:
        what = f"FAILED ({result['reason']})"
    eta = "" if eta_s is None else f", ETA {_duration(eta_s)}"
    print(f"run {n_done}/{n_total}  {result['key']}: {what}  {_duration(result.get('seconds'))}  "
          f"[{n_total - n_done} left{eta}]", flush=True)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _read_cached(cache: Path, job: FitJob, fingerprint: str) -> dict[str, Any] | None:
    path = cache / f"{job.key}.json"
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("config_hash") != config_hash(job.config) or rec.get("data_fingerprint") != fingerprint \
            or rec.get("dataset") != job.dataset:
        return None
    result = dict(rec["result"], key=job.key, dataset=job.dataset, config=job.config, cached=True, per_user=None)
    if job.per_user and result["status"] == "ok":
        pu = cache / f"{job.key}.per_user.parquet"
        if not pu.is_file():
            return None
        result["per_user"] = pd.read_parquet(pu)
    return result


def _finish(cache: Path, job: FitJob, raw: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    """The job's result dict; cached unless it is a non-divergence failure."""
    per_user = raw.pop("per_user", None)
    frame = pd.DataFrame(per_user) if per_user is not None else None
    diverged = bool(raw.pop("diverged", False))
    plain = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in raw.items()}
    plain.setdefault("reason", "")
    if plain["status"] == "ok" or diverged:
        if frame is not None:
            _atomic(cache / f"{job.key}.per_user.parquet", lambda p: frame.to_parquet(p, index=False))
        rec = {"key": job.key, "dataset": job.dataset, "config_hash": config_hash(job.config),
               "data_fingerprint": fingerprint, "config": job.config, "result": plain}
        _atomic(cache / f"{job.key}.json", lambda p: p.write_text(json.dumps(rec, indent=1, default=str)))
    return dict(plain, key=job.key, dataset=job.dataset, config=job.config, cached=False,
                per_user=frame if job.per_user and plain["status"] == "ok" else None)


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
