"""Plotly figure builders of the analysis layer, and a self-contained HTML page writer.

Every page embeds plotly.js (``include_plotlyjs=True`` on the first figure): it opens
offline and makes no network request. Source: plotly.graph_objects, plotly.io.to_html.
"""
from __future__ import annotations

import html
import math
import re
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

SIGNIFICANT, NOT_SIGNIFICANT = "#c0392b", "#7f8c8d"


def _html(value) -> str:
    """Text for plotly: ``<``, ``>``, ``&`` escaped (plotly reads them as markup), then markdown
    ``**bold**`` as plotly's ``<b>bold</b>``."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(str(value), quote=False))


def table_figure(table: pd.DataFrame, title: str = "") -> go.Figure:
    """A plotly table of ``table`` (index = first column, cells shown as their text; markdown
    ``**bold**`` becomes plotly's ``<b>bold</b>``)."""
    header = [_html(table.index.name or "")] + [_html(" ".join(map(str, c)) if isinstance(c, tuple) else c)
                                                for c in table.columns]
    cells = [list(map(_html, table.index))] + [list(map(_html, table[c])) for c in table.columns]
    row = 28  # px per row, header included; the figure is as tall as its rows (plotly clips otherwise)
    fig = go.Figure(go.Table(header={"values": header, "align": "left", "fill_color": "#eaeef2", "height": row},
                             cells={"values": cells, "align": "left", "height": row}))
    fig.update_layout(title=title or None, height=70 + row * (len(table) + 1) + 20,
                      margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig


def difference_figure(stats: pd.DataFrame, metrics: list[str], labels: dict[str, str] | None = None,
                      reference: str = "full") -> go.Figure:
    """Dot plot of each variant's mean per-user difference to ``reference`` with its bootstrap CI.

    stats: rows of :func:`analysis.stats.compare` (``dataset``, ``variant``, ``metric``,
    ``mean_diff_users``, ``ci_low``, ``ci_high``, ``significant``, ``p_seeds_holm``,
    ``p_users_holm``). One panel per (data set, metric): rows = data sets, columns = metrics;
    a red dot is significant by both tests, a grey one is not; the dashed line is 0.
    """
    labels = labels or {}
    datasets = list(dict.fromkeys(stats["dataset"]))
    titles = [f"{ds}: {labels.get(m, m)}" for ds in datasets for m in metrics]
    fig = make_subplots(rows=len(datasets), cols=len(metrics), subplot_titles=titles, shared_yaxes=False,
                        horizontal_spacing=0.18, vertical_spacing=max(0.04, 0.3 / len(datasets)))
    for r, ds in enumerate(datasets, 1):
        for c, m in enumerate(metrics, 1):
            sub = stats[(stats["dataset"] == ds) & (stats["metric"] == m) & (stats["variant"] != reference)]
            for sig, color, name in ((True, SIGNIFICANT, "significant (both tests, Holm)"),
                                     (False, NOT_SIGNIFICANT, "not significant")):
                part = sub[sub["significant"] == sig]
                x = part["mean_diff_users"].to_numpy(float)
                fig.add_trace(go.Scatter(
                    x=x, y=[_html(v) for v in part["variant"]], mode="markers", marker={"color": color, "size": 9},
                    name=name, legendgroup=name, showlegend=(r == 1 and c == 1),
                    error_x={"type": "data", "symmetric": False,
                             "array": _nz(part["ci_high"].to_numpy(float) - x),
                             "arrayminus": _nz(x - part["ci_low"].to_numpy(float))},
                    customdata=part[["ci_low", "ci_high", "p_seeds_holm", "p_users_holm"]].to_numpy(float),
                    hovertemplate="%{y}: Δ %{x:.4f} [%{customdata[0]:.4f}, %{customdata[1]:.4f}]<br>"
                                  "p seeds (Holm) %{customdata[2]:.3g}, p users (Holm) %{customdata[3]:.3g}"
                                  "<extra></extra>"), row=r, col=c)
            fig.add_vline(x=0, line_dash="dash", line_color="#555", row=r, col=c)
            order = [_html(v) for v in dict.fromkeys(stats["variant"]) if v != reference]
            fig.update_yaxes(categoryorder="array", categoryarray=order, autorange="reversed", row=r, col=c)
            fig.update_xaxes(title_text=f"Δ {labels.get(m, m)} vs {reference} (95% CI)", row=r, col=c)
    n_var = max(1, stats["variant"].nunique() - 1)
    fig.update_layout(height=max(320, (80 + 26 * n_var) * len(datasets)), margin={"t": 90},
                      legend={"orientation": "h", "x": 0, "y": 1.0, "yanchor": "top", "yref": "container"})
    return fig


def write_page(path: str | Path, title: str, blocks: list) -> Path:
    """Write one self-contained HTML page: ``blocks`` are HTML strings or plotly figures,
    in order; plotly.js is embedded once (with the first figure)."""
    parts, embedded = [], False
    for b in blocks:
        if isinstance(b, go.Figure):
            parts.append(b.to_html(full_html=False, include_plotlyjs=not embedded))
            embedded = True
        else:
            parts.append(str(b))
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title>"
            "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
            "td,th{padding:2px 8px}</style></head><body>\n<h1>" + html.escape(title) + "</h1>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def _nz(a):
    """Error-bar lengths: NaN (no interval) -> 0."""
    return [0.0 if not math.isfinite(v) else max(0.0, float(v)) for v in a]
