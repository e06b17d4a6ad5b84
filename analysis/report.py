"""The sensitivity report: sections of text, tables and plotly figures in one HTML file.

:func:`build` turns a finished search (plus its importance, boundary check and sweeps)
into a :class:`Report`; :meth:`Report.write` writes ``report.html`` -- one
self-contained file: plotly.js is embedded once (no ``<script src>``, no network
request, opens offline) -- and returns the figures for ``figures/*.png``.

Sections: title block (data set, metric, trials, seeds, budget), boundary check,
importance (fANOVA / PED-ANOVA), axis plots, contours, parallel coordinates,
optimization history, learning curves, one-at-a-time sweeps.
"""
from __future__ import annotations

import html
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from analysis import sens_figures as F
from analysis.boundary import NEAR, TOP_MIN, TOP_SHARE, WARN_SHARE, BoundaryWarning
from analysis.importance import EVALUATORS, Importance, complete_study, top_pairs
from analysis.search_folder import SearchFolder
from mmssl.config import Config

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1150px;
padding:0 24px 48px;color:#222;line-height:1.45}h1{margin:24px 0 4px}h2{margin-top:36px;border-bottom:1px solid #ddd}
.meta{border-collapse:collapse;margin:8px 0}.meta td{padding:2px 14px 2px 0;vertical-align:top}.meta td:first-child{color:#666}
table.tbl{border-collapse:collapse;font-size:13px;margin:8px 0}table.tbl th,table.tbl td{border:1px solid #ddd;padding:3px 8px;text-align:right}
table.tbl th{background:#f5f5f5}.warn{background:#fff3cd;border:1px solid #e0b000;padding:8px 12px;margin:8px 0;border-radius:4px}
.ok{background:#e8f5e9;border:1px solid #81c784;padding:8px 12px;margin:8px 0;border-radius:4px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:8px}nav a{margin-right:12px}
.note{color:#666;font-size:13px}"""
FEW_PER_PARAM = 3  # fewer COMPLETE trials than this per hyperparameter: the importance section says "mostly noise"


@dataclass
class Section:
    """One part of the report: ``text`` is HTML (already escaped), figures are (name, figure)."""

    id: str
    title: str
    text: str
    figures: list[tuple[str, go.Figure]] = field(default_factory=list)
    after: str = ""        # HTML after the figures (tables)
    grid: bool = False     # figures side by side


@dataclass
class Report:
    """The assembled report: ``header`` (title block HTML) and the sections."""

    title: str
    header: str
    sections: list[Section]

    @property
    def figures(self) -> dict[str, go.Figure]:
        """Every figure by its file name (``axis_cl_weight`` -> ``figures/axis_cl_weight.png``)."""
        return {name: fig for s in self.sections for name, fig in s.figures}

    def html(self) -> str:
        """The whole page; plotly.js inline once, every figure drawn by ``Plotly.newPlot``."""
        nav = " ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in self.sections)
        body = []
        for s in self.sections:
            divs = "".join(_figure_div(n, f) for n, f in s.figures)
            if s.grid and divs:
                divs = f'<div class="grid">{divs}</div>'
            body.append(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>{s.text}{divs}{s.after}</section>')
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}"
                f"</title><style>{CSS}</style>\n<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>"
                f"<body>{self.header}<nav>{nav}</nav>{''.join(body)}</body></html>\n")

    def write(self, path: Path) -> None:
        path.write_text(self.html(), encoding="utf-8")


def _figure_div(name: str, fig: go.Figure) -> str:
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, include_mathjax=False, div_id=f"fig-{name}",
                       config={"displaylogo": False, "responsive": True})


def _p(*parts: str) -> str:
    return "".join(f"<p>{p}</p>" for p in parts)


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, classes="tbl", border=0, float_format=lambda v: f"{v:.4g}", na_rep="")


def build(search: SearchFolder, imp: Importance, boundary: pd.DataFrame, warns: list[BoundaryWarning],
          sweeps: pd.DataFrame | None = None, sweep_info: dict[str, Any] | None = None) -> Report:
    """Assemble the report of ``search``.

    ``imp``: :func:`analysis.importance.importances`; ``boundary``/``warns``:
    :func:`analysis.boundary.check_boundaries`; ``sweeps``: the ``sweeps.csv`` table
    (None: no sweep), ``sweep_info``: ``seeds``, ``epochs``, ``grids`` of the sweep.
    """
    sp, trials, metric = search.space, search.trials, search.metric
    best_id = search.best.get("trial_id")
    counts = trials["status"].value_counts().to_dict()
    e = html.escape
    title = f"MMSSL sensitivity report: {search.path.name}"
    seeds = (sweep_info or {}).get("seeds")
    rows = [("data set", search.data_name), ("metric", f"{metric} (maximised; value at each trial's selected epoch)"),
            ("trials", f"{len(trials)}: completed {counts.get('completed', 0)}, stopped early (ASHA) "
                       f"{counts.get('stopped_early', 0)}, failed {counts.get('failed', 0)}"),
            ("budget", f"up to {sp.max_epochs} epochs per trial; ASHA grace {sp.grace_period}, factor "
                       f"{sp.reduction_factor:g}; patience {sp.fixed.get('patience', Config().patience)}"
                       + (f"; sweeps: {sweep_info['epochs']} epochs per run, no scheduler" if sweep_info else "")),
            ("seeds", f"trials: config seed {sp.fixed.get('seed', Config().seed)}; final re-training: "
                      f"{list(sp.final_seeds) or 'none'}; sweeps: {list(seeds) if seeds else 'no sweep'}"),
            ("best trial", f"{best_id}: {metric} {search.best.get('val', {}).get(metric, float('nan')):.4f}"
             if best_id else "none (every trial failed)"),
            ("search folder", str(search.path)), ("generated", time.strftime("%Y-%m-%d %H:%M:%S %Z"))]
    header = (f"<h1>{e(title)}</h1><table class=\"meta\">"
              + "".join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in rows) + "</table>")
    sections = [_boundary_section(boundary, warns, trials), _importance_section(imp),
                Section("axes", "Objective against each hyperparameter", _p(
                    f"One point per trial: {e(metric)} at its selected epoch against the sampled value, coloured by "
                    "outcome (failed trials, which have no value, as crosses below the lowest point); dashed lines "
                    "mark the search range, the star the best trial; log axes for log distributions."),
                    [(f"axis_{k}", F.axis_plot(trials, p, metric, best_id)) for k, p in sp.params.items()], grid=True)]
    sections += _study_sections(search, imp)
    sections.append(_sweep_section(search, sweeps, sweep_info))
    return Report(title, header, sections)


def _boundary_section(table: pd.DataFrame, warns: list[BoundaryWarning], trials: pd.DataFrame) -> Section:
    ok = int(((trials["status"] != "failed") & trials["objective"].notna()).sum())
    text = _p(f"Top trials: the best {TOP_SHARE:.0%} by the objective, at least {TOP_MIN}, among the {ok} trials that "
              f"did not fail. A trial is near a bound when it lies within {NEAR:.0%} of the range from it, measured in "
              "the distribution's own scale (log for log distributions). A warning is raised when at least "
              f"{WARN_SHARE:.0%} of the top trials are near the same bound: the best value may lie outside the range.")
    if warns:
        text += "".join(f'<div class="warn">&#9888; {html.escape(w.message())}</div>' for w in warns)
    else:
        text += '<div class="ok">No hyperparameter has its top trials crowding a bound.</div>'
    return Section("boundary", "Boundary check", text, after=_table(_boundary_wide(table)))


def _boundary_wide(table: pd.DataFrame) -> pd.DataFrame:
    """One row per hyperparameter: each bound and the share of top trials near it (boundary.csv is long)."""
    rows = []
    for key, t in table.groupby("hyperparameter", sort=False):
        lo, hi = t[t["bound"] == "low"].iloc[0], t[t["bound"] == "high"].iloc[0]
        rows.append({"hyperparameter": key, "scale": lo["scale"], "low": lo["value"], "near low": f"{lo['share']:.0%}",
                     "high": hi["value"], "near high": f"{hi['share']:.0%}", "top trials": int(lo["n_top"]),
                     "warning": "widen: " + " and ".join(b for b, w in (("low", lo["warning"]), ("high", hi["warning"]))
                                                           if w) if (lo["warning"] or hi["warning"]) else ""})
    return pd.DataFrame(rows)


def _importance_section(imp: Importance) -> Section:
    left = ", ".join(f"{n} {s}" for s, n in sorted(imp.left_out.items())) or "none"
    text = _p(f"fANOVA and PED-ANOVA (<code>optuna.importance</code>) on the <b>{imp.n_complete} COMPLETE trials</b>; "
              f"left out: {html.escape(left)} (PRUNED trials were stopped by ASHA at a smaller budget, FAIL trials "
              "have no value). Each evaluator's importances sum to 1. fANOVA: variance of the objective explained by "
              "each hyperparameter (random forest); PED-ANOVA: how much each hyperparameter's distribution in the "
              "top 10% differs from the whole.")
    n_params = imp.table["hyperparameter"].nunique() if len(imp.table) else 0
    if len(imp.table) and imp.n_complete < FEW_PER_PARAM * n_params:
        text += (f'<div class="warn">Caution: {imp.n_complete} COMPLETE trials for {n_params} hyperparameters '
                 f'(fewer than {FEW_PER_PARAM} per hyperparameter). Both evaluators fit the objective on so few points '
                 'that these importances are mostly noise; run more trials before reading them.</div>')
    if imp.notes:
        text += '<p class="note">' + "<br>".join(html.escape(n) for n in imp.notes) + "</p>"
    if not len(imp.table):
        return Section("importance", "Hyperparameter importance", text)
    wide = imp.table.pivot(index="hyperparameter", columns="evaluator", values="importance")
    wide = wide.reindex(index=list(dict.fromkeys(imp.table["hyperparameter"])),
                        columns=[c for c in EVALUATORS if c in wide.columns])
    wide.columns.name = None
    wide = wide.reset_index()
    return Section("importance", "Hyperparameter importance", text, [("importance", F.importance_bars(imp.table))],
                   after=_table(wide))


def _study_sections(search: SearchFolder, imp: Importance) -> list[Section]:
    sp, metric = search.space, search.metric
    complete = complete_study(search.study)
    ranking = imp.ranking() if len(imp.table) else []
    pairs = top_pairs(ranking)
    contours, notes = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for a, b in pairs:
            contours.append((f"contour_{a}__{b}", F.contour(complete, (a, b))))
        par = [("parallel", F.parallel(complete, list(sp.params)))] if len(complete.trials) >= 2 else []
    notes = list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught if "experimental" not in str(w.message)))
    note = ('<p class="note">' + "<br>".join(html.escape(n) for n in notes) + "</p>") if notes else ""
    pair_text = (", ".join(f"{a} × {b}" for a, b in pairs) if pairs else
                 "none: the importance needs at least two COMPLETE trials")
    rungs = F.asha_rungs(sp)
    return [
        Section("contours", "Contours of the most important pairs", _p(
            "Optuna's contour plot of the objective over the pairs formed by the most important hyperparameter "
            f"(fANOVA) with the next two: {html.escape(pair_text)}. COMPLETE trials only.") + note, contours, grid=True),
        Section("parallel", "Parallel coordinates", _p(
            "Every COMPLETE trial as a line through its values, coloured by the objective "
            "(<code>optuna.visualization.plot_parallel_coordinate</code>).") if par else _p(
            "Fewer than two COMPLETE trials: no parallel-coordinate plot."), par),
        Section("history", "Optimization history", _p(
            f"{html.escape(metric)} of each trial in sampling order, and the best so far over the trials that did "
            "not fail (the best configuration is chosen among them)."), [("history", F.history(search.trials, metric))]),
        Section("curves", "Learning curves", _p(
            f"{html.escape(metric)} per epoch of every trial (<code>curves.parquet</code>), coloured by outcome; "
            f"dotted lines: ASHA's rungs at epochs {', '.join(map(str, rungs)) or 'none'}, where trials below the "
            f"top 1/{sp.reduction_factor:g} were stopped."),
            [("curves", F.learning_curves(search.curves, search.trials, metric, rungs))]),
    ]


def _sweep_section(search: SearchFolder, sweeps: pd.DataFrame | None, info: dict[str, Any] | None) -> Section:
    title = "One-at-a-time sweeps"
    if sweeps is None or info is None:
        return Section("sweeps", title, _p("No sweep was run. Add <code>--sweep configs/sensitivity.yaml</code> to "
                                           "train the best configuration with one hyperparameter changed at a time."))
    n_runs, failed = sweeps["run_key"].nunique(), sweeps.loc[sweeps["status"] != "ok", "run_key"].nunique()
    patience = (search.best.get("config") or {}).get("patience", Config().patience)
    full = search.space.max_epochs
    budget = "the search's full budget" if info["epochs"] == full else \
        f"<b>not</b> the search's full budget of {full} epochs: set with --epochs or the file's 'epochs'"
    text = _p(f"Around the best configuration ({html.escape(str(search.best.get('trial_id')))}), each hyperparameter "
              f"over its grid with seeds {list(info['seeds'])}: {n_runs} distinct runs ({failed} failed; the best "
              f"value's runs are shared by every panel), each of {info['epochs']} epochs ({budget}) with no "
              f"scheduler (fit's own patience {patience} stays), validation selection on val/recall@20 and the test "
              "split evaluated once at the selected epoch. Lines: mean over seeds; bands: ± sample std; dotted "
              "vertical line: the searched best value.")
    figs = []
    for key in info["grids"]:
        rows = sweeps[sweeps["hyperparameter"] == key]
        figs.append((f"sweep_{key}", F.sweep_panel(rows, search.space.params[key],
                                                   search.best_params().get(key), len(info["seeds"]))))
    summary = []
    for key in info["grids"]:
        st = F.sweep_stats(sweeps[sweeps["hyperparameter"] == key])
        st.insert(0, "hyperparameter", key)
        summary.append(st)
    return Section("sweeps", title, text, figs, after=_table(pd.concat(summary, ignore_index=True)), grid=True)
