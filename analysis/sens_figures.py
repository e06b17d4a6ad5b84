"""Plotly figures of the sensitivity report (one function per figure, each returns a ``go.Figure``).

Trial outcomes use one colour everywhere: completed (blue), stopped early by
ASHA (orange), failed (red). Axes of log-distributed hyperparameters are log axes.
Contour and parallel-coordinate plots come from ``optuna.visualization`` (COMPLETE
trials only, as the importance); the others are built here from the search's
``trials`` / ``curves`` tables and the sweeps table.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go

from tune.space import Param

OUTCOMES = {"completed": ("completed", "#1f77b4"), "stopped_early": ("stopped early (ASHA)", "#ff7f0e"),
            "failed": ("failed", "#d62728")}
SWEEP_METRICS = ("val/recall@20", "val/ndcg@20", "test/recall@20", "test/ndcg@20")
_METRIC_STYLE = {"recall": "#1f77b4", "ndcg": "#2ca02c"}
HEIGHT = 380


def is_log(p: Param) -> bool:
    return p.dist == "loguniform" or bool(p.log)


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = HEIGHT) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.01), xaxis_title=x, yaxis_title=y, height=height,
                      template="plotly_white", margin=dict(l=60, r=20, t=50, b=50),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def importance_bars(table: pd.DataFrame) -> go.Figure:
    """Grouped horizontal bars: one bar per (hyperparameter, evaluator); ``table`` as in
    ``analysis.importance.Importance.table`` (share of the total, per evaluator)."""
    fig = go.Figure()
    order = list(dict.fromkeys(table["hyperparameter"]))[::-1]  # most important on top
    for name, color in (("fANOVA", "#1f77b4"), ("PED-ANOVA", "#9467bd")):
        t = table[table["evaluator"] == name].set_index("hyperparameter").reindex(order)
        fig.add_trace(go.Bar(y=order, x=t["importance"], name=name, orientation="h", marker_color=color,
                             hovertemplate="%{y}: %{x:.3f}<extra>" + name + "</extra>"))
    fig.update_layout(barmode="group")
    return _layout(fig, "Hyperparameter importance (COMPLETE trials)", "importance (share of the total)", "",
                   height=max(HEIGHT, 60 + 34 * len(order)))


def axis_plot(trials: pd.DataFrame, p: Param, metric: str, best_id: str | None = None) -> go.Figure:
    """The objective against hyperparameter ``p``: one point per trial, coloured by outcome.

    ``trials``: the search's trials table. Failed trials have no objective; they are
    drawn as crosses below the lowest objective. The search range is marked by dashed
    lines at its bounds. Traces: one per outcome present, then ``best trial``.
    """
    fig = go.Figure()
    floor = _floor(trials["objective"])
    for status, (label, color) in OUTCOMES.items():
        t = trials[trials["status"] == status]
        if not len(t):
            continue
        y = t["objective"] if status != "failed" else pd.Series(floor, index=t.index)
        text = [f"trial {r.trial_id}<br>{getattr(r, 'reason', '')}" for r in t.itertuples()]
        fig.add_trace(go.Scatter(x=t[p.key], y=y, mode="markers", name=label, text=text,
                                 marker=dict(color=color, size=9, symbol="x" if status == "failed" else "circle",
                                             opacity=0.85),
                                 hovertemplate=f"{p.key}=%{{x:.4g}}<br>{metric}=%{{y:.4f}}<br>%{{text}}<extra></extra>"))
    if best_id is not None and (trials["trial_id"] == best_id).any():
        b = trials[trials["trial_id"] == best_id].iloc[0]
        fig.add_trace(go.Scatter(x=[b[p.key]], y=[b["objective"]], mode="markers", name="best trial",
                                 marker=dict(symbol="star", size=16, color="gold", line=dict(color="black", width=1))))
    if p.dist != "categorical":
        for bound in (p.low, p.high):
            fig.add_vline(x=bound, line=dict(color="gray", dash="dash", width=1))
        fig.update_xaxes(type="log" if is_log(p) else "linear")
    return _layout(fig, f"{metric} against {p.key}", p.key + (" (log)" if is_log(p) else ""), metric)


def contour(complete: optuna.Study, pair: tuple[str, str]) -> go.Figure:
    """``optuna.visualization.plot_contour`` of the objective over ``pair`` (COMPLETE trials)."""
    fig = optuna.visualization.plot_contour(complete, params=list(pair), target_name="objective")
    fig.update_layout(title=dict(text=f"Objective over {pair[0]} × {pair[1]} (COMPLETE trials)", x=0.01),
                      height=HEIGHT + 60, template="plotly_white")
    return fig


def parallel(complete: optuna.Study, params: list[str]) -> go.Figure:
    """``optuna.visualization.plot_parallel_coordinate`` over ``params`` (COMPLETE trials)."""
    fig = optuna.visualization.plot_parallel_coordinate(complete, params=params, target_name="objective")
    fig.update_layout(title=dict(text="Parallel coordinates (COMPLETE trials)", x=0.01), height=HEIGHT + 80,
                      template="plotly_white")
    return fig


def history(trials: pd.DataFrame, metric: str) -> go.Figure:
    """Objective of each trial in sampling order, coloured by outcome, and the best so far.

    The best-so-far line runs over trials that did not fail, as ``tune.results.pick_best``
    chooses the best trial. Failed trials sit below the lowest objective, as crosses.
    """
    t = trials.copy()
    t["order"] = t["optuna_number"] if "optuna_number" in t and t["optuna_number"].notna().all() else range(len(t))
    t = t.sort_values("order", kind="stable")
    fig = go.Figure()
    floor = _floor(t["objective"])
    for status, (label, color) in OUTCOMES.items():
        s = t[t["status"] == status]
        if len(s):
            y = s["objective"] if status != "failed" else pd.Series(floor, index=s.index)
            fig.add_trace(go.Scatter(x=s["order"], y=y, mode="markers", name=label, text=s["trial_id"],
                                     marker=dict(color=color, size=8, symbol="x" if status == "failed" else "circle")))
    ok = t["objective"].where(t["status"] != "failed")
    fig.add_trace(go.Scatter(x=t["order"], y=ok.cummax(), mode="lines", name="best so far",
                             line=dict(color="black", shape="hv")))
    return _layout(fig, "Optimization history", "trial (sampling order)", metric)


def asha_rungs(space) -> list[int]:
    """Epochs at which ASHA compares trials (its rungs), from Ray's own scheduler object."""
    from ray.tune.schedulers import ASHAScheduler

    s = ASHAScheduler(time_attr="epoch", metric="m", mode="max", max_t=space.max_epochs,
                      grace_period=space.grace_period, reduction_factor=space.reduction_factor)
    return sorted(int(m) for m, _ in s._brackets[0]._rungs)


def learning_curves(curves: pd.DataFrame, trials: pd.DataFrame, metric: str, rungs: list[int]) -> go.Figure:
    """``metric`` per epoch for every trial, coloured by outcome; ASHA's rungs as dotted lines.

    One trace per trial (legend: one entry per outcome).
    """
    fig = go.Figure()
    status = dict(zip(trials["trial_id"].astype(str), trials["status"], strict=True))
    shown = set()
    if metric in curves.columns:
        for tid, c in curves.groupby(curves["trial_id"].astype(str), sort=False):
            st = status.get(tid, "completed")
            label, color = OUTCOMES.get(st, OUTCOMES["completed"])
            c = c.sort_values("epoch")
            fig.add_trace(go.Scatter(x=c["epoch"], y=c[metric], mode="lines+markers", name=label,
                                     legendgroup=st, showlegend=st not in shown, line=dict(color=color, width=1.5),
                                     marker=dict(size=4), hovertemplate=f"trial {tid}<br>epoch %{{x}}: %{{y:.4f}}"
                                     "<extra></extra>"))
            shown.add(st)
    for r in rungs:
        fig.add_vline(x=r, line=dict(color="gray", dash="dot", width=1), annotation_text=f"rung {r}",
                      annotation_position="top")
    return _layout(fig, f"Learning curves ({metric}); dotted: ASHA rungs", "epoch", metric)


def sweep_stats(rows: pd.DataFrame, metrics=SWEEP_METRICS) -> pd.DataFrame:
    """Mean, sample std (ddof=1; 0 for one seed) and count over seeds per value.

    ``rows``: sweep rows of one hyperparameter (``value``, the metric columns; runs with
    an ``error`` have NaN metrics and are not counted). Returns one row per value.
    """
    ok = rows.dropna(subset=[m for m in metrics if m in rows.columns], how="all")
    g = ok.groupby("value", sort=True)
    out = pd.DataFrame({"n": g.size()})
    for m in metrics:
        if m in ok.columns:
            out[f"{m} mean"] = g[m].mean()
            out[f"{m} std"] = g[m].std(ddof=1).fillna(0.0)
    return out.reset_index()


def sweep_panel(rows: pd.DataFrame, p: Param, best_value: Any, n_seeds: int) -> go.Figure:
    """Val/test Recall@20 and NDCG@20 against the value of ``p``: mean line ± std band.

    Traces, per metric in :data:`SWEEP_METRICS`: a band (``<metric> ± std``, filled,
    no legend entry) and the mean line (``<metric>``); then ``searched best`` (a
    vertical dashed line at the search's best value).
    """
    st = sweep_stats(rows)
    fig = go.Figure()
    x = st["value"].to_numpy(dtype=object if p.dist == "categorical" else float)
    for m in SWEEP_METRICS:
        if f"{m} mean" not in st:
            continue
        mean, std = st[f"{m} mean"].to_numpy(float), st[f"{m} std"].to_numpy(float)
        color = _METRIC_STYLE["recall" if "recall" in m else "ndcg"]
        fig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([mean + std, (mean - std)[::-1]]),
                                 mode="lines", fill="toself", fillcolor=_rgba(color, 0.15), line=dict(width=0),
                                 name=f"{m} ± std",
                                 legendgroup=m, showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=mean, mode="lines+markers", name=m, legendgroup=m,
                                 line=dict(color=color, dash="solid" if m.startswith("val/") else "dash"),
                                 customdata=np.stack([std, st["n"].to_numpy()], axis=1),
                                 hovertemplate=f"{p.key}=%{{x:.4g}}<br>{m} %{{y:.4f}} ± %{{customdata[0]:.4f}}"
                                 f"<br>%{{customdata[1]}}/{n_seeds} seeds<extra></extra>"))
    ys = [v for m in SWEEP_METRICS if f"{m} mean" in st for v in
          np.concatenate([st[f"{m} mean"] + st[f"{m} std"], st[f"{m} mean"] - st[f"{m} std"]])]
    ys = [v for v in ys if math.isfinite(v)] or [0.0, 1.0]
    fig.add_trace(go.Scatter(x=[best_value, best_value], y=[min(ys), max(ys)], mode="lines", name="searched best",
                             line=dict(color="black", dash="dot", width=2)))
    if p.dist != "categorical":
        fig.update_xaxes(type="log" if is_log(p) else "linear")
    return _layout(fig, f"Sweep of {p.key} ({n_seeds} seeds; band: ± std)", p.key + (" (log)" if is_log(p) else ""),
                   "metric (selected epoch)")


def _floor(objective: pd.Series) -> float:
    """Where failed trials (no objective) are drawn: a little below the lowest objective."""
    finite = objective.dropna()
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    return lo - 0.08 * ((hi - lo) or abs(lo) or 1.0)


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"
