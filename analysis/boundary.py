"""Boundary check: do the best trials crowd a bound of the search range?

For each numerical searched hyperparameter the top trials (the best 10% by the
objective, at least 3; failed trials excluded, ranked like ``tune.results.pick_best``)
are placed in the distribution's own scale: ``log(x)`` for a log distribution
(``loguniform``, ``int`` with ``log: true``), ``x`` otherwise. A trial is *near* a bound
when its distance to it is at most ``near`` (default 5%) of the range's width in
that scale. When at least ``share`` (default: half) of the top trials are near the
same bound, the optimum may lie outside the range: a warning names the
hyperparameter and the bound ("widen the range"). Categorical parameters have no
bound and are skipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tune.space import Param

TOP_SHARE = 0.10   # the best 10% of the trials ...
TOP_MIN = 3        # ... and at least 3
NEAR = 0.05        # within 5% of the range (in the distribution's scale)
WARN_SHARE = 0.5   # warn when at least half of the top trials are near one bound


@dataclass(frozen=True)
class BoundaryWarning:
    """One hyperparameter whose top trials crowd one bound."""

    hyperparameter: str
    bound: str          # "low" or "high"
    value: float        # the bound itself
    share: float        # share of the top trials near it, in [0, 1]
    n_top: int

    def message(self) -> str:
        side = "lower" if self.bound == "low" else "upper"
        return (f"{self.hyperparameter}: {round(self.share * self.n_top)}/{self.n_top} of the top trials lie within "
                f"{NEAR:.0%} of the {side} bound {self.value:g}: widen the range")


def n_top(n_trials: int, top_share: float = TOP_SHARE, top_min: int = TOP_MIN) -> int:
    """How many trials are "the best": ``max(top_min, ceil(top_share * n))``, at most ``n``."""
    return min(n_trials, max(top_min, math.ceil(top_share * n_trials)))


def scaled(values, param: Param) -> np.ndarray:
    """Values in the distribution's own scale, as fractions of the range: 0 = low, 1 = high.

    ``values``: array-like of the parameter's values [n]; returns float [n].
    Raises ValueError for a categorical parameter (it has no bounds).
    """
    if param.dist == "categorical":
        raise ValueError(f"{param.key}: a categorical parameter has no bounds")
    x = np.asarray(values, dtype=float)
    lo, hi = float(param.low), float(param.high)
    if param.log or param.dist == "loguniform":
        x, lo, hi = np.log(x), math.log(lo), math.log(hi)
    return (x - lo) / (hi - lo)


def top_trials(trials: pd.DataFrame, top_share: float = TOP_SHARE, top_min: int = TOP_MIN) -> pd.DataFrame:
    """The best trials by ``objective`` (max), failed trials and missing objectives excluded."""
    ok = trials[(trials["status"] != "failed") & trials["objective"].notna()]
    return ok.sort_values("objective", ascending=False, kind="stable").head(n_top(len(ok), top_share, top_min))


def check_boundaries(trials: pd.DataFrame, params: dict[str, Param], near: float = NEAR,
                     warn_share: float = WARN_SHARE, top_share: float = TOP_SHARE,
                     top_min: int = TOP_MIN) -> tuple[pd.DataFrame, list[BoundaryWarning]]:
    """The ``boundary.csv`` table and the warnings.

    ``trials``: the search's trials table (``status``, ``objective``, one column per
    parameter). Returns (table with columns ``hyperparameter``, ``bound`` (low/high),
    ``value``, ``scale`` (log/linear), ``share`` (of the top trials near it), ``n_top``,
    ``warning`` (bool); two rows per numerical parameter), and the warnings in
    parameter order.
    """
    top = top_trials(trials, top_share, top_min)
    rows, warns = [], []
    for key, p in params.items():
        if p.dist == "categorical" or key not in top.columns:
            continue
        pos = scaled(top[key].to_numpy(dtype=float), p) if len(top) else np.array([])
        for bound, dist, value in (("low", pos, p.low), ("high", 1.0 - pos, p.high)):
            share = float(np.mean(dist <= near + 1e-12)) if len(top) else 0.0
            warn = bool(len(top) and share >= warn_share)
            rows.append({"hyperparameter": key, "bound": bound, "value": float(value),
                         "scale": "log" if (p.log or p.dist == "loguniform") else "linear",
                         "share": share, "n_top": len(top), "warning": warn})
            if warn:
                warns.append(BoundaryWarning(key, bound, float(value), share, len(top)))
    cols = ["hyperparameter", "bound", "value", "scale", "share", "n_top", "warning"]
    return pd.DataFrame(rows, columns=cols), warns
