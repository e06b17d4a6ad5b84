"""Tune's saved experiment state (``OUT/NAME/experiment_state-*.json``): read it, and repair it.

Used by ``tune.runner.restore_tuner`` and the ``--resume`` path of ``tune/search.py``,
through Ray's public ``ExperimentAnalysis`` where it suffices.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def trial_dirname_of(trial_id: str) -> str:
    """A trial's folder inside the experiment (``tune.runner`` names them so)."""
    return f"trial_{trial_id}"


def mark_failed_trials(exp_dir: Path, study_path: Path, study_name: str) -> list[str]:
    """Record as ERROR, in Tune's saved state, the trials that failed but were saved as RUNNING.

    Ray 2.60 does not re-save a trial whose actor died (worker/node lost beyond
    ``max_failures``): ``TuneController._schedule_trial_stop`` returns before marking it
    for the snapshot, so the state file keeps it RUNNING and ``Tuner.restore`` would
    re-run it even without ``resume_errored``. The study knows better: a trial told
    FAIL there (``ray_trial_id``) whose saved status is RUNNING/PENDING/PAUSED is set to
    ERROR in the newest ``experiment_state-*.json``, pointing at its ``error.txt`` /
    ``error.pkl``. ``study_path``/``study_name``: the study (SQLite file). Returns the
    trial ids changed.
    """
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if not states or not study_path.is_file():
        return []
    import optuna

    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{Path(study_path).resolve()}")
    failed = {t.user_attrs.get("ray_trial_id") for t in study.get_trials(deepcopy=False)
              if t.state == optuna.trial.TrialState.FAIL}
    doc = json.loads(states[-1].read_text())
    changed = []
    for pair in doc.get("trial_data", []):
        trial = json.loads(pair[0])
        if trial.get("trial_id") in failed and trial.get("status") in ("RUNNING", "PENDING", "PAUSED"):
            trial["status"] = "ERROR"
            pair[0] = json.dumps(trial, indent=2)
            meta = json.loads(pair[1])  # point Tune at the error files, as it would have
            for key, name in (("error_filename", "error.txt"), ("pickled_error_filename", "error.pkl")):
                if (exp_dir / trial_dirname_of(trial["trial_id"]) / name).is_file():
                    meta[key] = name
            pair[1] = json.dumps(meta, indent=2)
            changed.append(trial["trial_id"])
    if changed:
        tmp = states[-1].with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, states[-1])
    return changed


def tune_trial_ids(exp_dir: Path) -> set[str] | None:
    """The trial ids in the experiment state Tune will restore (None when unreadable)."""
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id for t in ExperimentAnalysis(str(exp_dir.resolve())).trials}
    except Exception:  # noqa: BLE001 - no state yet: Tune.restore reports that itself
        return None


def experiment_status(exp_dir: Path) -> dict[str, int]:
    """Trials per Tune status (TERMINATED, ERROR, RUNNING, PENDING, ...) in ``exp_dir``'s saved state."""
    from ray.tune import ExperimentAnalysis

    counts: dict[str, int] = {}
    for t in ExperimentAnalysis(str(exp_dir.resolve())).trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    return counts
