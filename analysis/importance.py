"""Hyperparameter importance of a finished search: Optuna's fANOVA and PED-ANOVA.

Both evaluators run on the study's COMPLETE trials only: trials ASHA stopped
(PRUNED) carry an objective measured at a smaller budget, and FAIL trials none,
so they are left out (:func:`complete_study` copies the COMPLETE trials into an
in-memory study; the report states how many were used and how many left out).

* fANOVA (Hutter et al., ICML 2014): ``optuna.importance.FanovaImportanceEvaluator``
  (a random forest on the trials, needs scikit-learn; seeded here);
* PED-ANOVA (Watanabe et al., IJCAI 2023): ``optuna.importance.PedAnovaImportanceEvaluator``
  (importance of reaching the top ``target_quantile`` of the objective).

Both are normalised to sum to 1 (``optuna.importance.get_param_importances``,
``normalize=True``), so the two bars of a hyperparameter are comparable shares.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
import pandas as pd
from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator
from optuna.trial import TrialState

EVALUATORS = ("fANOVA", "PED-ANOVA")
MIN_COMPLETE = 2  # fewer COMPLETE trials than this: no importance can be estimated


def make_evaluator(name: str, seed: int = 0):
    """The Optuna evaluator called ``name`` (one of :data:`EVALUATORS`), with fixed settings.

    fANOVA: ``FanovaImportanceEvaluator(seed=seed)`` (64 trees, depth 64, Optuna's defaults);
    PED-ANOVA: ``PedAnovaImportanceEvaluator()`` (target quantile 0.1, whole space).
    Raises ValueError for an unknown name.
    """
    if name == "fANOVA":
        return FanovaImportanceEvaluator(seed=seed)
    if name == "PED-ANOVA":
        return PedAnovaImportanceEvaluator()
    raise ValueError(f"unknown importance evaluator {name!r} (known: {', '.join(EVALUATORS)})")


def complete_study(study: optuna.Study) -> optuna.Study:
    """An in-memory study holding only ``study``'s COMPLETE trials (same direction)."""
    copy = optuna.create_study(directions=study.directions)
    copy.add_trials(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    return copy


@dataclass
class Importance:
    """Importance table plus the counts and notes the report must show.

    ``table``: columns ``hyperparameter``, ``evaluator``, ``importance`` (share in [0, 1],
    each evaluator's values summing to 1), sorted by fANOVA importance then name;
    ``n_complete`` trials were used, ``left_out`` counts the others by state name
    (``PRUNED``, ``FAIL``, ...); ``notes``: Optuna's warnings and why a value is missing.
    """

    table: pd.DataFrame
    n_complete: int
    left_out: dict[str, int]
    notes: list[str] = field(default_factory=list)

    def ranking(self, evaluator: str = "fANOVA") -> list[str]:
        """Hyperparameters from most to least important by ``evaluator``."""
        t = self.table[self.table["evaluator"] == evaluator]
        return list(t.sort_values(["importance", "hyperparameter"], ascending=[False, True])["hyperparameter"])


def importances(study: optuna.Study, params: list[str], seed: int = 0) -> Importance:
    """fANOVA and PED-ANOVA importance of ``params`` on the COMPLETE trials of ``study``.

    ``params`` are the searched config keys (the study's parameter names). With fewer
    than :data:`MIN_COMPLETE` COMPLETE trials the table is empty and ``notes`` says why.
    Source: ``optuna.importance.get_param_importances`` (Optuna docs, "optuna.importance").
    """
    all_trials = study.get_trials(deepcopy=False)
    left: dict[str, int] = {}
    for t in all_trials:
        if t.state != TrialState.COMPLETE:
            left[t.state.name] = left.get(t.state.name, 0) + 1
    complete = complete_study(study)
    n = len(complete.trials)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    if n < MIN_COMPLETE:
        notes.append(f"only {n} COMPLETE trial(s): no importance can be estimated (need at least {MIN_COMPLETE})")
        return Importance(pd.DataFrame(columns=["hyperparameter", "evaluator", "importance"]), n, left, notes)
    present = [p for p in params if all(p in t.params for t in complete.trials)]
    for p in params:
        if p not in present:
            notes.append(f"{p}: not in every COMPLETE trial; left out of the importance")
    for name in EVALUATORS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            values = optuna.importance.get_param_importances(complete, evaluator=make_evaluator(name, seed),
                                                             params=present)
        for w in caught:
            msg = str(w.message).splitlines()[0]
            if f"{name}: {msg}" not in notes:
                notes.append(f"{name}: {msg}")
        rows += [{"hyperparameter": p, "evaluator": name, "importance": float(values.get(p, 0.0))} for p in present]
    table = pd.DataFrame(rows)
    order = {p: i for i, p in enumerate(_fanova_order(table))}
    table["_o"] = table["hyperparameter"].map(order)
    table = table.sort_values(["_o", "evaluator"], kind="stable").drop(columns="_o").reset_index(drop=True)
    return Importance(table, n, left, notes)


def _fanova_order(table: pd.DataFrame) -> list[str]:
    t = table[table["evaluator"] == "fANOVA"]
    return list(t.sort_values(["importance", "hyperparameter"], ascending=[False, True])["hyperparameter"])


def top_pairs(ranking: list[str], n_pairs: int = 2) -> list[tuple[str, str]]:
    """The pairs for the contour plots: (1st, 2nd), (1st, 3rd), ... of ``ranking``.

    fANOVA as Optuna exposes it gives main effects only, so the "most important pairs"
    are formed from the most important single hyperparameters.
    """
    if len(ranking) < 2:
        return []
    return [(ranking[0], ranking[i]) for i in range(1, min(len(ranking), n_pairs + 1))]
