"""One-at-a-time sweeps around a search's best configuration (``--sweep FILE``).

The sweep file (YAML; ``configs/sensitivity.yaml`` is the documented example)::

    sweep:                     # searched hyperparameters (config keys or paper aliases)
      cl_weight: {}            # a grid of `values` points spanning its search range
      fusion_weight: {n: 7}    # ... of 7 points
      cl_tau: {values: [0.1, 0.5, 1.0]}   # explicit values
    values: 5                  # default points per grid (log-spaced for log distributions)
    seeds: 3                   # seeds 1..3, or an explicit list [1, 2, 3]
    epochs: null               # per run; default the search's full budget (fixed.epochs)
    budget: {cpus_per_run: 1, gpus_per_run: 0, max_concurrent: 2}

``sweep`` may also be a plain list of names. Every grid also holds the best value of
the search (``best.json`` ``params``). Each (hyperparameter, value, seed) is one
``mmssl.train.fit`` of the best configuration with that one value changed: full
budget, no scheduler (fit's own ``patience`` stays), validation selection and test
evaluated once, launched by ``tune.runner.run_fits`` (cached per run: finished runs
are never re-run). Configurations equal across panels (the best value at a seed) run
once and share their ``run_key``. Bad files are one-line ConfigErrors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from mmssl.config import Config, canonical_key, read_yaml_mapping
from mmssl.errors import ConfigError
from tune.space import Param, Space

TOP_KEYS = ("sweep", "values", "seeds", "epochs", "budget")
BUDGET_KEYS = ("cpus_per_run", "gpus_per_run", "max_concurrent")
DEFAULT_VALUES = 5
DEFAULT_SEEDS = 3


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep file: ``grids`` maps each config key to its sorted values."""

    path: str
    grids: dict[str, tuple]
    seeds: tuple[int, ...] = tuple(range(1, DEFAULT_SEEDS + 1))
    epochs: int | None = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    max_concurrent: int | None = None


def grid(p: Param, best: Any, n: int = DEFAULT_VALUES) -> tuple:
    """``n`` values spanning ``p``'s search range plus ``best``, sorted and distinct.

    Log distributions: ``numpy.geomspace(low, high, n)``; others ``numpy.linspace``;
    ``int``: rounded (and on the step); float with ``step``: snapped to the step;
    categorical: every choice. A grid value equal to ``best`` (relative 1e-9) is
    replaced by ``best`` itself, so the best configuration is run exactly.
    """
    if p.dist == "categorical":
        return tuple(p.choices)
    lo, hi = float(p.low), float(p.high)
    pts = np.geomspace(lo, hi, n) if (p.dist == "loguniform" or p.log) else np.linspace(lo, hi, n)
    if p.dist == "int":
        step = p.step or 1
        vals = [int(lo + step * round((v - lo) / step)) for v in pts]
    elif p.step:
        vals = [float(lo + p.step * round((v - lo) / p.step)) for v in pts]
    else:
        vals = [float(v) for v in pts]
    if best is not None:
        vals = [v for v in vals if not math.isclose(float(v), float(best), rel_tol=1e-9, abs_tol=0.0)] + [best]
    return tuple(sorted(set(vals), key=float))


def load_sweep(path: str, space: Space, best: dict[str, Any]) -> SweepSpec:
    """Read and validate the sweep file against the search's ``space`` and ``best`` params.

    Raises ConfigError (one line naming the file and key): bad YAML, an unknown key,
    a hyperparameter that was not searched, a bad grid size / seed / value.
    """
    raw = read_yaml_mapping(path)
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key '{unknown[0]}' (known: {', '.join(TOP_KEYS)})")
    n = _int(raw.get("values", DEFAULT_VALUES), f"{path}: values", minimum=2)
    entries = raw.get("sweep")
    if isinstance(entries, list):
        entries = {k: {} for k in entries}
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"{path}: 'sweep' must be a non-empty mapping (or list) of searched hyperparameters")
    grids: dict[str, tuple] = {}
    for raw_key, spec in entries.items():
        key = canonical_key(str(raw_key), f"{path}: sweep")
        if key not in space.params:
            raise ConfigError(f"{path}: sweep.{raw_key}: '{key}' was not searched (searched: {', '.join(space.params)})")
        if key in grids:
            raise ConfigError(f"{path}: sweep: '{key}' given twice (once as an alias)")
        spec = {} if spec is None else spec
        if not isinstance(spec, dict) or set(spec) - {"n", "values"} or len(spec) > 1:
            raise ConfigError(f"{path}: sweep.{raw_key}: expected {{}}, {{n: N}} or {{values: [...]}}, got {spec!r}")
        b = best.get("params", {}).get(key)
        if "values" in spec:
            vals = spec["values"]
            if not isinstance(vals, list) or not vals:
                raise ConfigError(f"{path}: sweep.{raw_key}.values: must be a non-empty list, got {vals!r}")
        else:
            vals = list(grid(space.params[key], b, _int(spec.get("n", n), f"{path}: sweep.{raw_key}.n", minimum=2)))
        typed = []
        for v in vals:
            try:  # typed as the config types it (YAML 1.1 reads 1e-3 as a string)
                typed.append(getattr(Config.from_dict({**(best.get("config") or {}), key: v}), key))
            except ConfigError as e:
                raise ConfigError(f"{path}: sweep.{raw_key}: value {v!r} is not valid ({str(e).split(': ', 1)[-1]})") \
                    from None
        if b is not None and not any(_same(v, b) for v in typed):
            typed.append(b)
        g = tuple(sorted(set(typed), key=_order))
        grids[key] = g
    seeds = raw.get("seeds", DEFAULT_SEEDS)
    if isinstance(seeds, list):
        seeds_t = tuple(_int(s, f"{path}: seeds", minimum=0) for s in seeds)
        if not seeds_t or len(set(seeds_t)) != len(seeds_t):
            raise ConfigError(f"{path}: seeds: a non-empty list of distinct integers, got {seeds!r}")
    else:
        seeds_t = tuple(range(1, _int(seeds, f"{path}: seeds", minimum=1) + 1))
    epochs = raw.get("epochs")
    epochs = None if epochs is None else _int(epochs, f"{path}: epochs", minimum=1)
    budget = raw.get("budget") or {}
    if not isinstance(budget, dict) or set(budget) - set(BUDGET_KEYS):
        bad = sorted(set(budget) - set(BUDGET_KEYS)) if isinstance(budget, dict) else [repr(budget)]
        raise ConfigError(f"{path}: budget: unknown key '{bad[0]}' (known: {', '.join(BUDGET_KEYS)})")
    kw: dict[str, Any] = {}
    if "cpus_per_run" in budget:
        kw["cpus_per_run"] = _pos(budget["cpus_per_run"], f"{path}: budget.cpus_per_run", strict=True)
    if "gpus_per_run" in budget:
        kw["gpus_per_run"] = _pos(budget["gpus_per_run"], f"{path}: budget.gpus_per_run", strict=False)
    if budget.get("max_concurrent") is not None:
        kw["max_concurrent"] = _int(budget["max_concurrent"], f"{path}: budget.max_concurrent", minimum=1)
    return SweepSpec(str(path), grids, seeds_t, epochs, **kw)


def with_overrides(spec: SweepSpec, **changes: Any) -> SweepSpec:
    """A copy with the CLI's overrides (``None`` = keep the file's value)."""
    return replace(spec, **{k: v for k, v in changes.items() if v is not None})


def plan(spec: SweepSpec, space: Space, best: dict[str, Any], dataset: str) -> tuple[pd.DataFrame, list]:
    """The runs of the sweep: (rows, jobs).

    ``rows``: one per (hyperparameter, value, seed) with ``run_key``; ``jobs``: the
    distinct ``tune.runner.FitJob`` s (the best configuration at a seed appears in every
    panel but runs once). Config: ``best.json``'s ``config`` with the one value changed,
    ``seed``, and ``epochs`` = ``spec.epochs`` or the search's ``fixed.epochs``.
    """
    from tune.runner import FitJob, job_key

    base = dict(best.get("config") or {})
    if not base:
        raise ConfigError("the search has no best configuration (every trial failed): nothing to sweep around")
    base["epochs"] = spec.epochs or space.max_epochs
    rows, jobs = [], {}
    for key, values in spec.grids.items():
        best_value = best.get("params", {}).get(key)
        for v in values:
            for s in spec.seeds:
                cfg = Config.from_dict({**base, key: _plain(v), "seed": int(s)}).to_dict()
                cfg.pop("device", None)
                run_key = job_key(dataset, "sweep", s, cfg)
                jobs.setdefault(run_key, FitJob(run_key, dataset, cfg, False))
                rows.append({"hyperparameter": key, "value": _plain(v), "seed": int(s),
                             "is_best": best_value is not None and _same(v, best_value), "run_key": run_key})
    return pd.DataFrame(rows), list(jobs.values())


RESULT_COLS = ("status", "reason", "cached", "best_epoch", "epochs_run", "stopped_early", "seconds")


def table(rows: pd.DataFrame, results: list[dict[str, Any]]) -> pd.DataFrame:
    """``sweeps.csv``: ``rows`` joined with each run's outcome and its val/test metrics."""
    by_key = {r["key"]: r for r in results}
    out = []
    for row in rows.to_dict("records"):
        r = by_key.get(row["run_key"], {})
        rec = dict(row)
        rec.update({c: r.get(c) for c in RESULT_COLS})
        rec.update({k: float(v) for k, v in r.items() if k.startswith(("val/", "test/")) and v is not None})
        out.append(rec)
    return pd.DataFrame(out)


def _order(v: Any) -> Any:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _int(v: Any, where: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer() or v < minimum:
        raise ConfigError(f"{where}: must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _pos(v: Any, where: str, strict: bool) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 if strict else v >= 0)
    if not ok:
        raise ConfigError(f"{where}: must be a number {'> 0' if strict else '>= 0'}, got {v!r}")
    return float(v)
