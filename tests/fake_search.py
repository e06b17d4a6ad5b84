"""Build a finished search folder without training (for the sensitivity tests).

The folder has what ``tune/search.py`` writes and ``analysis/search_folder.py`` reads:
``search.json``, ``trials.parquet``, ``curves.parquet``, ``best.json`` and an Optuna
``study.db`` whose trials carry exactly the given parameters, values and states.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState, create_trial

from tune.space import Param, Space

PARAMS = {
    "cl_weight": Param("cl_weight", "loguniform", 1e-3, 1.0),
    "dropout": Param("dropout", "uniform", 0.0, 0.5),
    "n_layers": Param("n_layers", "int", 1, 4),
}
FIXED = {"epochs": 3, "patience": 0, "embed_dim": 16, "n_heads": 4, "batch_size": 32, "adversarial": False,
         "topk_rate": 0.05, "eval_chunk": 512}
STATUS = {"COMPLETE": "completed", "PRUNED": "stopped_early", "FAIL": "failed"}


def space_for(folder: Path, data: str = "synthetic:120x80") -> Space:
    return Space(path="tests/fake_search.py", params=dict(PARAMS), fixed=dict(FIXED), data=data, num_samples=0,
                 grace_period=1, reduction_factor=3.0, final_seeds=(), name=folder.name, out=str(folder.parent))


def make_search(folder: Path, params: list[dict], values: list[float], states: list[str],
                data: str = "synthetic:120x80") -> Path:
    """Write a finished search folder with one trial per (params, value, state); returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    space = space_for(folder, data)
    dists = space.optuna_space()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{folder / 'study.db'}", study_name="mmssl", direction="maximize")
    rows, curves = [], []
    for i, (p, v, s) in enumerate(zip(params, values, states, strict=True)):
        tid = f"t{i:04d}"
        epochs = 1 if s == "PRUNED" else FIXED["epochs"]
        state = TrialState[s]
        study.add_trial(create_trial(params=p, distributions=dists, state=state,
                                     value=v if state == TrialState.COMPLETE else None,
                                     intermediate_values={e: v for e in range(1, epochs + 1)} if s != "FAIL" else {},
                                     user_attrs={"ray_trial_id": tid}))
        obj = np.nan if s == "FAIL" else float(v)
        rows.append({"trial_id": tid, "status": STATUS[s], "epochs": epochs, "best_epoch": epochs, **p,
                     "val/recall@20": obj, "val/ndcg@20": obj / 2, "objective": obj, "seconds": 1.0,
                     "reason": "diverged" if s == "FAIL" else "", "optuna_number": i, "optuna_state": s})
        if s != "FAIL":
            for e in range(1, epochs + 1):
                curves.append({"trial_id": tid, "epoch": e, "val/recall@20": obj * e / epochs,
                               "best/val/recall@20": obj * e / epochs})
    trials = pd.DataFrame(rows)
    trials.to_parquet(folder / "trials.parquet", index=False)
    trials.to_csv(folder / "trials.csv", index=False)
    pd.DataFrame(curves).to_parquet(folder / "curves.parquet", index=False)
    ok = trials[trials["status"] != "failed"]
    top = ok.loc[ok["objective"].idxmax()]
    best_params = {k: (int(top[k]) if PARAMS[k].dist == "int" else float(top[k])) for k in PARAMS}
    best = {"metric": "val/recall@20", "data": data, "subset_users": None, "experiment": str(folder),
            "trial_id": top["trial_id"], "status": top["status"], "best_epoch": int(top["best_epoch"]),
            "params": best_params, "config": {**FIXED, **best_params}, "val": {"val/recall@20": float(top["objective"])}}
    (folder / "best.json").write_text(json.dumps(best))
    (folder / "search.json").write_text(json.dumps({"path": "tests/fake_search.py", "overrides": {},
                                                    "space": space.to_dict()}))
    return folder


def random_trials(n: int, seed: int = 0) -> list[dict]:
    """``n`` parameter sets drawn uniformly in each distribution's own scale."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        out.append({"cl_weight": float(10 ** rng.uniform(-3, 0)), "dropout": float(rng.uniform(0, 0.5)),
                    "n_layers": int(rng.integers(1, 5))})
    return out


def importance_search(folder: Path, n: int = 40, seed: int = 0) -> Path:
    """Objective driven by log(cl_weight) (peak inside the range), a little by dropout; 30 COMPLETE,
    8 PRUNED, 2 FAIL trials in a mixed order."""
    params = random_trials(n, seed)
    rng = np.random.default_rng(seed + 1)
    values = [0.4 - 0.05 * (np.log10(p["cl_weight"]) + 1.5) ** 2 - 0.1 * p["dropout"] + 0.003 * rng.standard_normal()
              for p in params]
    states = (["COMPLETE"] * 3 + ["PRUNED"]) * 8 + ["COMPLETE"] * 6 + ["FAIL"] * 2
    return make_search(folder, params, values, states[:n])


def boundary_search(folder: Path, where: str) -> Path:
    """27 ordinary trials and 3 best ones; ``where="low"``: the best have ``cl_weight`` within
    5% (log scale) of the lower bound 1e-3; ``where="inside"``: every parameter of the best
    trials is mid-range."""
    params = random_trials(27, seed=3)
    for p in params:  # the ordinary trials stay away from the bounds in every parameter
        p["cl_weight"] = float(np.clip(p["cl_weight"], 0.003, 0.3))
        p["dropout"] = float(np.clip(p["dropout"], 0.05, 0.45))
        p["n_layers"] = 2 + p["n_layers"] % 2
    values = [0.2 + 0.01 * i / 27 for i in range(27)]
    best_cl = [1.0e-3, 1.1e-3, 1.3e-3] if where == "low" else [0.02, 0.03, 0.04]
    params += [{"cl_weight": c, "dropout": 0.25, "n_layers": 3} for c in best_cl]
    values += [0.5, 0.49, 0.48]
    return make_search(folder, params, values, ["COMPLETE"] * 30)
