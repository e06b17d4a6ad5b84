"""Turn a finished search into files: trials, curves, best configuration, summary.

Written into the experiment folder ``OUT/NAME/``:

* ``trials.csv`` / ``trials.parquet`` -- one row per trial: ``trial_id``, ``status``
  (``completed`` / ``stopped_early`` / ``failed``), ``epochs``, ``best_epoch``, one column
  per searched hyperparameter, the ``val/*`` metrics at the trial's selected epoch,
  ``objective`` (``best/<metric>``), ``seconds``, ``reason`` (why it stopped or failed),
  ``node_ip`` / ``node_id`` / ``device`` (where its last epoch ran: host, Ray node id,
  ``cpu`` or ``cuda (GPU ids [..])``), ``nodes`` (every node id it reported from, in
  order, ``;``-separated: a trial retried after a node loss shows both),
  ``optuna_number`` / ``optuna_state`` (its trial in ``study.db``);
* ``curves.parquet`` -- every reported epoch of every trial (``trial_id``, ``epoch``,
  ``train/*``, ``val/*``, ``best/*``, ``time/epoch_s``, ``time_total_s``);
* ``best.json`` -- the best configuration, its val metrics, the final seeds' test
  metrics (each seed, mean, std);
* ``summary.md`` -- top trials, the final test table and the cost ledger.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ray.tune.utils import flatten_dict

from mmssl import jsonio

from tune.runner import failure_reason
from tune.searcher import DIVERGED_KEY, FINISHED_KEY, REASON_KEY
from tune.space import Space
from tune.trainable import DEVICE_KEY, NODE_KEY

STATUSES = ("completed", "stopped_early", "failed")
CURVE_PREFIXES = ("train/", "val/", "best/", "time/")
TEST_KEYS = ("test/recall@20", "test/ndcg@20", "test/precision@20", "test/hit@20")


def collect(results, space: Space, study=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, curves) tables from a Ray ``ResultGrid`` and the Optuna study."""
    by_ray = {t.user_attrs.get("ray_trial_id"): t for t in (study.get_trials() if study else [])}
    rows, curves = [], []
    for r in results:
        last = flatten_dict(dict(r.metrics or {}), delimiter="/")
        trial_id = str(last.get("trial_id") or Path(r.path).name.removeprefix("trial_"))
        curve = _curve(r.metrics_dataframe, trial_id)
        curves.append(curve)
        epochs = int(curve["epoch"].max()) if len(curve) else 0
        best_epoch = int(last.get("best/epoch", 0) or 0)
        if r.error is not None:
            status, reason = "failed", failure_reason(r.error)
        elif last.get(DIVERGED_KEY):
            status, reason = "failed", str(last.get(REASON_KEY) or "diverged")
        elif last.get(FINISHED_KEY):
            status = "completed"
            reason = "max epochs" if epochs >= space.max_epochs else f"patience ({space.fixed.get('patience', 'default')})"
        else:
            status, reason = "stopped_early", f"ASHA at epoch {epochs}"
        row: dict[str, Any] = {"trial_id": trial_id, "status": status, "epochs": epochs, "best_epoch": best_epoch}
        row.update({k: (r.config or {}).get(k) for k in space.params})
        at_best = curve[curve["epoch"] == best_epoch] if len(curve) else curve
        for k in (c for c in curve.columns if c.startswith("val/")):
            row[k] = float(at_best[k].iloc[-1]) if len(at_best) else math.nan
        row["objective"] = _num(last.get(f"best/{space.metric}"))
        row["seconds"] = _num(last.get("time_total_s"))
        row["reason"] = reason
        row["node_ip"] = last.get("node_ip")   # Tune's own key: the host of the trial's last report
        row["node_id"] = last.get(NODE_KEY)    # Ray's node id (unique even for nodes sharing an IP)
        row["nodes"] = _nodes(r.metrics_dataframe)
        row["device"] = last.get(DEVICE_KEY)
        ot = by_ray.get(trial_id)
        row["optuna_number"] = ot.number if ot is not None else None
        row["optuna_state"] = ot.state.name if ot is not None else None
        rows.append(row)
    trials = pd.DataFrame(rows)
    if len(trials):
        trials = trials.sort_values("optuna_number", kind="stable", na_position="last").reset_index(drop=True)
    curves_df = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["trial_id", "epoch"])
    return trials, curves_df


def count_finished(results) -> int:
    """Trials that ended (completed, stopped or failed); an interrupted run has fewer than num_samples."""
    return sum(1 for r in results if r.error is not None or (r.metrics or {}).get("done"))


def _curve(df: pd.DataFrame | None, trial_id: str) -> pd.DataFrame:
    if df is None or not len(df) or "epoch" not in df.columns:
        return pd.DataFrame({"trial_id": pd.Series(dtype=str), "epoch": pd.Series(dtype=int)})
    keep = ["epoch"] + [c for c in df.columns if c.startswith(CURVE_PREFIXES)] + \
        [c for c in ("time_total_s", "training_iteration", FINISHED_KEY) if c in df.columns]
    out = df[keep].copy()
    out.insert(0, "trial_id", trial_id)
    if DIVERGED_KEY in df.columns:  # the divergence report repeats the last good values: not an epoch
        out = out[df[DIVERGED_KEY].fillna(0) == 0]
    out = out.dropna(subset=["epoch"])
    out["epoch"] = out["epoch"].astype(int)
    # the "finished" report after a patience stop repeats the last epoch: keep one row per epoch
    return out.drop_duplicates(subset=["epoch"], keep="last").reset_index(drop=True)


def _nodes(df: pd.DataFrame | None) -> str | None:
    """The node ids a trial reported from, first seen first, ``;``-separated."""
    if df is None or NODE_KEY not in df.columns:
        return None
    return ";".join(dict.fromkeys(str(n) for n in df[NODE_KEY].dropna() if n))


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def pick_best(trials: pd.DataFrame) -> pd.Series | None:
    """The trial with the highest objective (val metric at its selected epoch), failures excluded."""
    ok = trials[(trials["status"] != "failed") & trials["objective"].notna()]
    if not len(ok):
        return None
    return ok.loc[ok["objective"].idxmax()]


def final_table(finals: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed test metrics plus mean and std (sample std, ddof=1) over the seeds that finished."""
    ok = [f for f in finals if "error" not in f]
    keys = sorted({k for f in ok for k in f if k.startswith("test/")})
    mean = {k: float(np.mean([f[k] for f in ok])) for k in keys} if ok else {}
    std = {k: float(np.std([f[k] for f in ok], ddof=1)) if len(ok) > 1 else 0.0 for k in keys} if ok else {}
    seeds = [{k: v for k, v in f.items() if k == "seed" or k.startswith(("test/", "val/")) or
              k in ("best_epoch", "epochs_run", "stopped_early", "seconds", "error")} for f in finals]
    return {"seeds": seeds, "mean": mean, "std": std, "n_ok": len(ok)}


def cost_ledger(trials: pd.DataFrame, space: Space, wall_search: float, wall_final: float,
                finals: list[dict[str, Any]]) -> dict[str, Any]:
    """Trial-epochs run against the full budget, and where the savings came from."""
    budget = space.num_samples * space.max_epochs
    run = int(trials["epochs"].sum()) if len(trials) else 0
    saved = {s: int((space.max_epochs - trials.loc[trials["status"] == s, "epochs"]).sum()) for s in STATUSES}
    per_trial = space.gpus_per_trial if space.gpus_per_trial > 0 else space.cpus_per_trial
    unit = "GPU-hours" if space.gpus_per_trial > 0 else "CPU-core-hours"
    trial_s = float(trials["seconds"].fillna(0).sum()) if len(trials) else 0.0
    final_s = float(sum(f.get("seconds", 0.0) for f in finals))
    return {"trial_epochs_run": run, "trial_epochs_budget": budget,
            "saved_share": 1 - run / budget if budget else 0.0,
            "saved_by_asha": saved["stopped_early"], "saved_by_patience": saved["completed"],
            "saved_by_failures": saved["failed"],
            "asha_share": saved["stopped_early"] / budget if budget else 0.0,
            "wall_search_s": wall_search, "wall_final_s": wall_final,
            "trial_seconds": trial_s, "final_seconds": final_s,
            "device_hours": (trial_s + final_s) * per_trial / 3600, "device_unit": unit}


def write_outputs(exp_dir: Path, space: Space, trials: pd.DataFrame, curves: pd.DataFrame,
                  best: dict[str, Any], ledger: dict[str, Any]) -> str:
    """Write every file of the experiment folder; returns the summary's markdown."""
    trials.to_csv(exp_dir / "trials.csv", index=False)
    trials.to_parquet(exp_dir / "trials.parquet", index=False)
    curves.to_parquet(exp_dir / "curves.parquet", index=False)
    (exp_dir / "best.json").write_text(jsonio.dumps({**best, "cost": ledger}, indent=2, default=_json,
                                                    why="null: a value that was not a finite number"))
    md = summary_markdown(space, trials, best, ledger)
    (exp_dir / "summary.md").write_text(md)
    return md


def _json(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_markdown(space: Space, trials: pd.DataFrame, best: dict[str, Any], ledger: dict[str, Any],
                     top: int = 5) -> str:
    counts = trials["status"].value_counts().to_dict() if len(trials) else {}
    parts = [f"# MMSSL search `{space.name}`", "",
             f"data: `{best.get('data')}` | metric: `{space.metric}` (max) | trials: {len(trials)} "
             f"(" + ", ".join(f"{s} {counts.get(s, 0)}" for s in STATUSES) + ")", ""]
    shown = trials[trials["status"] != "failed"].sort_values("objective", ascending=False).head(top)
    keys = list(space.params)
    parts += [f"## Top {len(shown)} trials (by {space.metric} at the selected epoch)", "",
              _table(["trial", "status", "epochs", space.metric, "val/ndcg@20"] + keys,
                     [[r.trial_id, r.status, int(r.epochs), float(r.objective), float(r.get("val/ndcg@20", math.nan))]
                      + [r[k] for k in keys] for _, r in shown.iterrows()]), ""]
    final = best.get("final") or {}
    if final.get("seeds"):
        rows = [[f.get("seed"), f.get("best_epoch")] + [f.get(k, math.nan) for k in TEST_KEYS] + [f.get("error", "")]
                for f in final["seeds"]]
        rows.append(["mean ± std", ""] + [f"{final['mean'].get(k, math.nan):.4f} ± {final['std'].get(k, math.nan):.4f}"
                                          for k in TEST_KEYS] + [""])
        parts += [f"## Final re-training of the best trial ({best.get('trial_id')}), "
                  f"{len(final['seeds'])} seeds, test evaluated once at each run's best val epoch", "",
                  _table(["seed", "best epoch"] + list(TEST_KEYS) + ["error"], rows), ""]
    led = ledger
    parts += ["## Cost ledger", "", _table(["item", "value"], [
        ["trial-epochs run", led["trial_epochs_run"]],
        ["budget: num_samples × max_epochs", f"{space.num_samples} × {space.max_epochs} = {led['trial_epochs_budget']}"],
        ["share of the budget saved", f"{100 * led['saved_share']:.1f}%"],
        ["saved by ASHA (stopped_early)", f"{led['saved_by_asha']} epochs ({100 * led['asha_share']:.1f}%)"],
        ["saved by patience / failures", f"{led['saved_by_patience']} / {led['saved_by_failures']} epochs"],
        ["wall time: search / final", f"{led['wall_search_s']:.0f} s / {led['wall_final_s']:.0f} s"],
        [f"device time ({led['device_unit']})", f"{led['device_hours']:.3f}"],
    ]), ""]
    return "\n".join(parts)
