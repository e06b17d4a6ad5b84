"""The ablation's outputs from its finished runs: tables, statistics, JSON, Markdown, LaTeX, HTML.

``write_all(folder, spec, rows, command, wall_s)`` writes, in ``folder``:

* ``runs.csv``: one row per (data set, variant, seed): ``dataset``, ``variant``, ``seed``,
  ``status``, ``reason``, ``best_epoch``, ``epochs``, ``seconds``, ``run_key`` (the run whose
  result it is: a variant whose config equals another's shares its runs), then every
  ``val/*`` and ``test/*`` metric;
* ``per_user.parquet``: ``dataset``, ``variant``, ``seed``, ``user`` and each ``test/<m>@K``
  (m in recall, precision, ndcg, hit; K in 10, 20, 50), one row per evaluated test user of
  every ok run;
* ``ablation.json``: every statistic of :func:`analysis.stats.compare` per data set,
  variant and test metric (raw and Holm p-values of both tests), the "identical to full"
  flags and the settings; NaN is written as null (strict JSON);
* ``ablation.md`` / ``ablation.tex`` (booktabs) / ``ablation.html`` (self-contained plotly):
  variants as rows, data set x {Recall@20, NDCG@20} as columns.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import figures
from analysis.ablation_config import REFERENCE, AblationSpec
from analysis.stats import ALPHA, CONFIDENCE, compare, identical_variants
from mmssl.metrics import metric_names

TEST_METRICS = metric_names(prefix="test/")
VAL_METRICS = metric_names(prefix="val/")
TABLE_METRICS = ["test/recall@20", "test/ndcg@20"]
LABELS = {"test/recall@20": "Recall@20", "test/ndcg@20": "NDCG@20"}
RUN_COLUMNS = ["dataset", "variant", "seed", "status", "reason", "best_epoch", "epochs", "seconds", "run_key"]
IDENTICAL = "identical to full: check its switches"


def runs_frame(rows: list[tuple[str, str, int, dict[str, Any]]]) -> pd.DataFrame:
    """``runs.csv``'s frame from ``(dataset, variant, seed, run_fits result)`` rows."""
    out = []
    for ds, var, seed, r in rows:
        row = {"dataset": ds, "variant": var, "seed": seed, "status": r["status"], "reason": r.get("reason", ""),
               "best_epoch": r.get("best_epoch", np.nan), "epochs": r.get("epochs_run", np.nan),
               "seconds": r.get("seconds", np.nan), "run_key": r["key"]}
        row.update({m: r.get(m, np.nan) for m in VAL_METRICS + TEST_METRICS})
        out.append(row)
    return pd.DataFrame(out, columns=RUN_COLUMNS + VAL_METRICS + TEST_METRICS)


def per_user_frame(rows: list[tuple[str, str, int, dict[str, Any]]]) -> pd.DataFrame:
    """``per_user.parquet``'s frame (ok runs only)."""
    parts = []
    for ds, var, seed, r in rows:
        pu = r.get("per_user")
        if r["status"] == "ok" and pu is not None:
            parts.append(pu[["user"] + TEST_METRICS].assign(dataset=ds, variant=var, seed=seed))
    cols = ["dataset", "variant", "seed", "user"] + TEST_METRICS
    if not parts:
        return pd.DataFrame(columns=cols)
    return pd.concat(parts, ignore_index=True)[cols]


def write_all(folder: Path, spec: AblationSpec, rows, command: str, wall_s: float) -> str:
    """Write every output (see the module docstring); returns the Markdown table."""
    runs, per_user = runs_frame(rows), per_user_frame(rows)
    runs.to_csv(folder / "runs.csv", index=False)
    per_user.to_parquet(folder / "per_user.parquet", index=False)
    stats = compare(runs, per_user, TEST_METRICS, reference=REFERENCE, seed=spec.stats_seed,
                    n_resamples=spec.n_resamples)
    identical = identical_variants(per_user, runs, TEST_METRICS, reference=REFERENCE)
    stats["identical_to_full"] = [(d, v) in identical for d, v in zip(stats["dataset"], stats["variant"])]
    meta = settings(spec, runs, command, wall_s)
    meta["budget_overrides"] = {var: f"at most {r['config']['epochs']} epochs, patience {r['config']['patience']}"
                                for _, var, _, r in rows
                                if (r["config"]["epochs"], r["config"]["patience"]) != (meta["epochs"], meta["patience"])}
    (folder / "ablation.json").write_text(json.dumps(_clean(to_json(stats, runs, meta)), indent=1, allow_nan=False))
    md = markdown(stats, runs, meta)
    (folder / "ablation.md").write_text(md)
    (folder / "ablation.tex").write_text(latex(stats, meta))
    html_page(folder / "ablation.html", stats, runs, meta)
    return md


def settings(spec: AblationSpec, runs: pd.DataFrame, command: str, wall_s: float) -> dict[str, Any]:
    """The settings and cost block shared by every output."""
    distinct = runs.drop_duplicates("run_key")
    return {"command": command, "seeds": spec.seeds, "epochs": spec.base["epochs"], "patience": spec.base["patience"],
            "base": spec.base_source, "datasets": {d.name: {"data": d.data, "subset_users": d.subset_users}
                                                   for d in spec.datasets},
            "selection": "val/recall@20, test evaluated once at the best epoch",
            "tests": {"seeds": "scipy.stats.ttest_rel (paired by seed)",
                      "users": "scipy.stats.wilcoxon (paired by user, metric averaged over seeds; zero_method=wilcox)",
                      "ci": f"scipy.stats.bootstrap, BCa, {CONFIDENCE:.0%}, mean per-user difference, "
                            f"n_resamples={spec.n_resamples}, seed={spec.stats_seed}"},
            "correction": "Holm (statsmodels multipletests) across the variants of a data set, per metric and test",
            "alpha": ALPHA, "runs": int(len(runs)), "distinct_runs": int(len(distinct)),
            "failed_runs": int((runs["status"] != "ok").sum()),
            "run_seconds_total": float(distinct["seconds"].sum(skipna=True)), "wall_seconds_this_call": float(wall_s)}


def to_json(stats: pd.DataFrame, runs: pd.DataFrame, meta: dict) -> dict:
    out: dict[str, Any] = {"settings": meta, "results": {}}
    for (ds, var), part in stats.groupby(["dataset", "variant"], sort=False):
        r = runs[(runs["dataset"] == ds) & (runs["variant"] == var)]
        entry = {"identical_to_full": bool(part["identical_to_full"].iloc[0]),
                 "runs_ok": int((r["status"] == "ok").sum()), "runs_failed": int((r["status"] != "ok").sum()),
                 "failures": [f"seed {s}: {why}" for s, why in zip(r["seed"], r["reason"]) if isinstance(why, str) and why],
                 "metrics": {}}
        for _, row in part.iterrows():
            entry["metrics"][row["metric"]] = {k: row[k] for k in part.columns
                                               if k not in ("dataset", "variant", "metric", "identical_to_full")}
        out["results"].setdefault(ds, {})[var] = entry
    return out


def cell(row: pd.Series, latex: bool = False) -> str:
    """``mean ± std (Δ%) mark``: ``*`` significant by both tests, else ``n.s.: <failed test(s)>``."""
    if not math.isfinite(row["mean"]):
        return "failed"
    pm = r" $\pm$ " if latex else " ± "
    text = f"{row['mean']:.4f}" + (f"{pm}{row['std']:.4f}" if math.isfinite(row["std"]) else "")
    if row["variant"] == REFERENCE:
        return text
    if row["identical_to_full"]:
        return text + (r" (= full$^\dagger$)" if latex else " (= full †)")
    pct = f"{row['delta_pct']:+.1f}%" if math.isfinite(row["delta_pct"]) else "n/a"
    if latex:
        pct = pct.replace("%", r"\%").replace("-", "$-$")
    if row["significant"]:
        return text + (f" ({pct})$^{{*}}$" if latex else f" ({pct}) *")
    failed = row["not_significant_by"].replace("seeds+users", "both")
    return text + (f" ({pct}, n.s.: {failed})")


def main_table(stats: pd.DataFrame, latex: bool = False) -> pd.DataFrame:
    """Variants x (data set, metric) of :func:`cell` strings, best mean per column in bold."""
    datasets = list(dict.fromkeys(stats["dataset"]))
    variants = list(dict.fromkeys(stats["variant"]))
    cols = pd.MultiIndex.from_tuples([(ds, LABELS[m]) for ds in datasets for m in TABLE_METRICS])
    table = pd.DataFrame("", index=pd.Index(variants, name="variant"), columns=cols)
    for ds in datasets:
        for m in TABLE_METRICS:
            part = stats[(stats["dataset"] == ds) & (stats["metric"] == m)]
            best = part["mean"].max()
            for _, row in part.iterrows():
                text = cell(row, latex)
                if math.isfinite(row["mean"]) and row["mean"] == best:
                    text = rf"\textbf{{{text}}}" if latex else f"**{text}**"
                table.loc[row["variant"], (ds, LABELS[m])] = text
    if latex:
        table.index = [_tex(v) for v in table.index]
        table.columns = pd.MultiIndex.from_tuples([(_tex(a), b) for a, b in table.columns])
    return table


def legend(meta: dict) -> str:
    sub = ", ".join(f"{n}: {d['subset_users']} random users" for n, d in meta["datasets"].items() if d["subset_users"])
    return (f"Mean ± std (sample, ddof 1) over seeds {meta['seeds']} of the test metric; at most {meta['epochs']} epochs "
            f"(patience {meta['patience']}), model selection on {meta['selection']}"
            + "".join(f"; {v}: {b}" for v, b in meta.get("budget_overrides", {}).items())
            + (f"; {sub}" if sub else "") + ". Δ% relative to full. * = significant: Holm-corrected p < "
            f"{meta['alpha']} for BOTH the paired t-test over seeds ({meta['tests']['seeds']}) and the Wilcoxon "
            "signed-rank test over test users (each user's metric averaged over seeds); n.s.: the test(s) that did "
            f"not hold. Correction: {meta['correction']}. Bold: best mean of the column. † identical to full "
            f"(every user, every seed): check its switches. Interval: {meta['tests']['ci']}.")


def markdown(stats: pd.DataFrame, runs: pd.DataFrame, meta: dict) -> str:
    table = main_table(stats)
    head = ["variant"] + [f"{ds} {m}" for ds, m in table.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([str(v)] + list(table.loc[v])) + " |" for v in table.index]
    out = ["# Ablation", "", *lines, "", legend(meta), ""]
    for ds, part in stats[stats["variant"] != REFERENCE].groupby("dataset", sort=False):
        out += [f"## {ds}: differences to full", "",
                "| variant | metric | Δ mean (users) [95% CI] | p seeds (Holm) | p users (Holm) | verdict |",
                "|---|---|---|---|---|---|"]
        for _, r in part[part["metric"].isin(TABLE_METRICS)].iterrows():
            verdict = "significant" if r["significant"] else f"n.s.: {r['not_significant_by'].replace('seeds+users', 'both')}"
            if r["identical_to_full"]:
                verdict = IDENTICAL
            out.append(f"| {r['variant']} | {LABELS[r['metric']]} | {_f(r['mean_diff_users'])} "
                       f"[{_f(r['ci_low'])}, {_f(r['ci_high'])}] | {_p(r['p_seeds'])} ({_p(r['p_seeds_holm'])}) | "
                       f"{_p(r['p_users'])} ({_p(r['p_users_holm'])}) | {verdict} |")
        out.append("")
    flags = [f"- {ds} / {v}: {IDENTICAL}" for ds, v in
             stats.loc[stats["identical_to_full"], ["dataset", "variant"]].drop_duplicates().itertuples(index=False)]
    fails = [f"- {r.dataset} / {r.variant} / seed {r.seed}: {r.reason}" for r in runs.itertuples()
             if r.status != "ok"]
    if flags:
        out += ["## Flags", "", *flags, ""]
    if fails:
        out += ["## Failed runs (left out of the statistics)", "", *fails, ""]
    out += ["## Settings", "", f"- command: `{meta['command']}`",
            f"- runs: {meta['runs']} ({meta['distinct_runs']} distinct, {meta['failed_runs']} failed), "
            f"{meta['run_seconds_total']:.0f} run-seconds, {meta['wall_seconds_this_call']:.0f} s wall (this call)", ""]
    return "\n".join(out)


def latex(stats: pd.DataFrame, meta: dict) -> str:
    """The main table as a booktabs ``table`` environment (needs ``\\usepackage{booktabs}``)."""
    table = main_table(stats, latex=True)
    body = table.style.to_latex(hrules=True, multicol_align="c", column_format="l" + "l" * table.shape[1])
    caption = _tex(legend(meta)).replace("±", r"$\pm$").replace("†", r"$^\dagger$").replace("Δ", r"$\Delta$")
    return ("% generated by analysis/ablation.py; needs \\usepackage{booktabs}\n\\begin{table}[t]\n\\centering\n"
            "\\small\n" + body + "\\caption{" + caption + "}\n\\label{tab:ablation}\n\\end{table}\n")


def html_page(path: Path, stats: pd.DataFrame, runs: pd.DataFrame, meta: dict) -> Path:
    table = main_table(stats)  # its **bold** becomes <b> in figures.table_figure
    fig = figures.difference_figure(stats, TABLE_METRICS, LABELS, reference=REFERENCE)
    return figures.write_page(path, "MMSSL ablation", [
        figures.table_figure(table, "Test metrics, mean ± std over seeds (Δ% vs full, significance)"),
        "<p>" + legend(meta).replace("<", "&lt;") + "</p>",
        "<h2>Difference to full per variant (mean per-user difference, 95% bootstrap CI)</h2>", fig,
        f"<p>Command: <code>{html.escape(meta['command'])}</code></p>"])


def _clean(x):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _tex(s: str) -> str:
    s = s.replace("\\", "\0")
    for a, b in (("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("{", r"\{"), ("}", r"\}"), ("$", r"\$")):
        s = s.replace(a, b)
    return s.replace("\0", r"\textbackslash{}")


def _f(v: float) -> str:
    return f"{v:+.4f}" if math.isfinite(v) else "n/a"


def _p(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else "n/a"
