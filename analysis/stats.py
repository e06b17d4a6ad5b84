"""Paired comparisons of a variant against a reference (``full``), as a reviewer asks for them.

Two sources of noise of the same size on real data (shared/design/mmssl.md, "Comparing two
models"): training seeds and test-user sampling. A difference is claimed only when BOTH
paired tests hold after a Holm correction across the comparisons of a family:

1. over seeds: ``scipy.stats.ttest_rel`` pairing seed s of the variant with seed s of the
   reference (seeds where both runs succeeded);
2. over test users: each user's metric averaged over those seeds, variant minus reference;
   ``scipy.stats.wilcoxon`` (signed-rank, zero differences dropped: ``zero_method="wilcox"``)
   and a seeded ``scipy.stats.bootstrap`` confidence interval (BCa) of the mean difference.
   Paired: the users are resampled with their pair, i.e. the bootstrap resamples the
   per-user differences.

Holm: ``statsmodels.stats.multitest.multipletests(method="holm")``, per data set, metric and
test, across the variants compared (NaN p-values are left out of the family and stay NaN).

Conventions: when every paired difference is exactly 0 (a variant wired to nothing) a test's
p-value is 1.0 and the interval is [0, 0]; scipy is not called (its answer would be NaN or a
warning). Fewer than 2 paired seeds: the seed test is NaN; no paired users: the user test is
NaN. NaN never counts as significant.

Run as a library: ``compare(runs, per_user, metrics)`` (see its docstring); the ablation CLI
(``analysis/ablation.py``) is the user.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

ALPHA = 0.05
CONFIDENCE = 0.95


def seed_test(variant: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Paired t-test over seeds: ``(t, p)`` of ``ttest_rel(variant, reference)`` (two-sided).

    variant, reference: float ``[n_seeds]``, paired by position (seed s with seed s).
    Returns ``(0.0, 1.0)`` when all differences are 0 and ``(nan, nan)`` for fewer than 2 pairs.
    Source: scipy.stats.ttest_rel.
    """
    v, r = np.asarray(variant, float), np.asarray(reference, float)
    if v.shape != r.shape or v.ndim != 1:
        raise ValueError(f"seed_test: need two equal 1-d arrays, got {v.shape} and {r.shape}")
    if v.size < 2:
        return math.nan, math.nan
    if np.all(v == r):
        return 0.0, 1.0
    res = stats.ttest_rel(v, r)
    return float(res.statistic), float(res.pvalue)


def user_test(diff: np.ndarray, seed: int = 0, n_resamples: int = 9999,
              confidence: float = CONFIDENCE) -> dict[str, float]:
    """Wilcoxon signed-rank test and bootstrap CI of the mean of per-user differences.

    diff: float ``[n_users]``, each user's (variant - reference) metric, averaged over the
    paired seeds. Returns ``{"w": statistic, "p": p-value (two-sided), "mean_diff": mean,
    "ci_low", "ci_high": the BCa interval at ``confidence``}`` with ``n_resamples`` resamples
    drawn from ``numpy.random.default_rng(seed)``. All zeros: ``w=0, p=1, ci=[0, 0]``; empty:
    all NaN; constant non-zero differences: the interval is the constant.
    Sources: scipy.stats.wilcoxon, scipy.stats.bootstrap.
    """
    d = np.asarray(diff, float)
    if d.ndim != 1:
        raise ValueError(f"user_test: diff must be 1-d, got shape {d.shape}")
    out = {"w": math.nan, "p": math.nan, "mean_diff": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    if d.size == 0:
        return out
    out["mean_diff"] = float(d.mean())
    if np.all(d == 0):
        return dict(out, w=0.0, p=1.0, ci_low=0.0, ci_high=0.0)
    w = stats.wilcoxon(d, zero_method="wilcox")
    out.update(w=float(w.statistic), p=float(w.pvalue))
    if np.ptp(d) == 0:
        return dict(out, ci_low=float(d[0]), ci_high=float(d[0]))
    ci = stats.bootstrap((d,), np.mean, vectorized=True, paired=False, n_resamples=n_resamples,
                         confidence_level=confidence, method="BCa", rng=np.random.default_rng(seed),
                         batch=500).confidence_interval
    return dict(out, ci_low=float(ci.low), ci_high=float(ci.high))


def holm(pvalues) -> np.ndarray:
    """Holm-adjusted p-values of one family; NaN entries are left out and stay NaN.

    Source: statsmodels.stats.multitest.multipletests(method="holm").
    """
    p = np.asarray(pvalues, float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], alpha=ALPHA, method="holm")[1]
    return out


def compare(runs: pd.DataFrame, per_user: pd.DataFrame, metrics: list[str], reference: str = "full",
            seed: int = 0, n_resamples: int = 9999) -> pd.DataFrame:
    """Every (dataset, variant, metric): mean ± std over seeds and the two paired tests vs ``reference``.

    runs: one row per run with ``dataset``, ``variant``, ``seed``, ``status`` ("ok"/"failed")
    and each metric column. per_user: ``dataset``, ``variant``, ``seed``, ``user`` and each
    metric column (rows of ok runs). metrics: names such as ``test/recall@20``.

    Returns one row per (dataset, variant, metric), in the order the variants first appear
    in ``runs``, with columns: ``n_ok`` (ok seeds), ``mean``, ``std`` (ddof=1; NaN for one
    seed), ``ref_mean``, ``delta`` (mean - ref_mean), ``delta_pct`` (100·delta/ref_mean, NaN
    when ref_mean is 0), ``n_pairs`` (seeds ok in both), ``t_seeds``, ``p_seeds``,
    ``p_seeds_holm``, ``n_users``, ``w_users``, ``p_users``, ``p_users_holm``,
    ``mean_diff_users``, ``ci_low``, ``ci_high``, ``significant`` (both Holm p < 0.05),
    ``not_significant_by`` ("", "seeds", "users" or "seeds+users"). The reference's own rows
    carry only the descriptive columns (tests NaN, ``significant`` False).
    Raises ValueError when a data set has no ``reference`` variant.
    """
    rows = []
    for ds, runs_ds in runs.groupby("dataset", sort=False):
        variants = list(dict.fromkeys(runs_ds["variant"]))
        if reference not in variants:
            raise ValueError(f"compare: data set {ds!r} has no {reference!r} variant")
        ok = runs_ds[runs_ds["status"] == "ok"]
        pu_ds = per_user[per_user["dataset"] == ds]
        ref_ok = ok[ok["variant"] == reference].set_index("seed")
        family: list[dict] = []
        for var in variants:
            v_ok = ok[ok["variant"] == var].set_index("seed")
            pairs = sorted(set(v_ok.index) & set(ref_ok.index))
            user_diff = _user_diffs(pu_ds, var, reference, pairs, metrics) if var != reference else None
            for m in metrics:
                vals, ref_vals = v_ok[m].to_numpy(float), ref_ok[m].to_numpy(float)
                mean, ref_mean = _mean(vals), _mean(ref_vals)
                row = {"dataset": ds, "variant": var, "metric": m, "n_ok": len(vals), "mean": mean,
                       "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan,
                       "ref_mean": ref_mean, "delta": mean - ref_mean,
                       "delta_pct": 100 * (mean - ref_mean) / ref_mean if ref_mean else math.nan,
                       "n_pairs": len(pairs)}
                if var != reference:
                    t, p = seed_test(v_ok.loc[pairs, m].to_numpy(float), ref_ok.loc[pairs, m].to_numpy(float))
                    d = user_diff[m].to_numpy(float) if user_diff is not None else np.zeros(0)
                    u = user_test(d, seed=seed, n_resamples=n_resamples)
                    row.update(t_seeds=t, p_seeds=p, n_users=int(d.size), w_users=u["w"], p_users=u["p"],
                               mean_diff_users=u["mean_diff"], ci_low=u["ci_low"], ci_high=u["ci_high"])
                    family.append(row)
                rows.append(row)
        for m in metrics:  # Holm per (data set, metric, test) across the variants
            fam = [r for r in family if r["metric"] == m]
            for test in ("seeds", "users"):
                for r, adj in zip(fam, holm([r[f"p_{test}"] for r in fam])):
                    r[f"p_{test}_holm"] = float(adj)
    out = pd.DataFrame(rows)
    for col in ("t_seeds", "p_seeds", "p_seeds_holm", "n_users", "w_users", "p_users", "p_users_holm",
                "mean_diff_users", "ci_low", "ci_high"):
        if col not in out:
            out[col] = math.nan
    seeds_ok = out["p_seeds_holm"] < ALPHA
    users_ok = out["p_users_holm"] < ALPHA
    out["significant"] = seeds_ok & users_ok
    out["not_significant_by"] = [
        "" if var == reference or (s and u) else "+".join(n for n, good in (("seeds", s), ("users", u)) if not good)
        for var, s, u in zip(out["variant"], seeds_ok, users_ok)]
    return out


def identical_variants(per_user: pd.DataFrame, runs: pd.DataFrame, metrics: list[str],
                       reference: str = "full") -> list[tuple[str, str]]:
    """``(dataset, variant)`` pairs whose per-user results equal the reference's for EVERY seed:
    same seeds ok, same users, every metric equal (exactly). Such a variant is wired to nothing."""
    found = []
    for (ds, var), runs_v in runs.groupby(["dataset", "variant"], sort=False):
        if var == reference:
            continue
        ref_runs = runs[(runs["dataset"] == ds) & (runs["variant"] == reference)]
        seeds = set(runs_v.loc[runs_v["status"] == "ok", "seed"])
        if not seeds or len(seeds) < len(runs_v) or seeds != set(ref_runs.loc[ref_runs["status"] == "ok", "seed"]):
            continue
        pu = per_user[per_user["dataset"] == ds]
        a = pu[pu["variant"] == var].sort_values(["seed", "user"])
        b = pu[pu["variant"] == reference].sort_values(["seed", "user"])
        if len(a) and len(a) == len(b) and np.array_equal(a[["seed", "user"]].to_numpy(), b[["seed", "user"]].to_numpy()) \
                and np.array_equal(a[metrics].to_numpy(float), b[metrics].to_numpy(float)):
            found.append((ds, var))
    return found


def _user_diffs(pu: pd.DataFrame, var: str, ref: str, seeds: list, metrics: list[str]) -> pd.DataFrame:
    """Per user (rows, by id): mean over ``seeds`` of the variant's metric minus the reference's."""
    def avg(name):
        sub = pu[(pu["variant"] == name) & pu["seed"].isin(seeds)]
        return sub.groupby("user")[metrics].mean()

    a, b = avg(var), avg(ref)
    users = a.index.intersection(b.index)
    return a.loc[users] - b.loc[users]


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else math.nan
