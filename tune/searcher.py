"""A prune-aware Ray Tune ``OptunaSearch``: ASHA-stopped trials reach Optuna as PRUNED.

Ray's stock ``OptunaSearch`` (ray 2.60, ``ray/tune/search/optuna/optuna_search.py``)
tells Optuna COMPLETE for every trial that ends with a result, including trials
that ASHA stopped at a low rung. Their truncated values then enter TPE's "good"
and "bad" groups as if they were final, and Optuna's importance and plots treat
them as finished runs. This subclass tells Optuna what actually happened:

* every result: ``trial.report(value, step=result["epoch"])`` (the stock class
  uses ``training_iteration``; ours is the epoch, ASHA's ``time_attr``);
* on completion, from what Ray passes to ``on_trial_complete(trial_id, result, error)``:

  - ``error=True`` (the trainable raised, e.g. DivergedError)          -> FAIL
  - the metric is missing, NaN or infinite                              -> FAIL
  - the last result carries ``trial/finished`` (the trainable sets it on
    the report of its max epoch, and on an extra report after its own
    patience early stop)                                                -> COMPLETE(value)
  - otherwise the scheduler stopped it                                  -> PRUNED

  The completing result is reported as an intermediate value first: when ASHA
  stops a trial, Ray skips ``on_trial_result`` for that result (see
  ``TuneController._process_trial_result``), so the rung value would be lost.

The sampler is a seeded ``TPESampler``; the study lives in an RDB storage file
(``sqlite:///OUT/NAME/study.db``) so that ``optuna.load_study`` can reload it and
``Tuner.restore`` continues it. Each Optuna trial carries user attributes
``ray_trial_id`` and, once finished, ``outcome`` (completed / stopped_early / failed)
and ``reason``.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

logger = logging.getLogger(__name__)

STEP_KEY = "epoch"
FINISHED_KEY = "trial/finished"
OUTCOMES = {TrialState.COMPLETE: "completed", TrialState.PRUNED: "stopped_early", TrialState.FAIL: "failed"}


def storage_url(path: str | os.PathLike) -> str:
    """The SQLAlchemy URL of an SQLite study file (absolute path)."""
    return f"sqlite:///{os.path.abspath(os.fspath(path))}"


class PruneAwareOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that reports per-epoch values and tells PRUNED / COMPLETE / FAIL correctly.

    Args:
        space: parameter name -> Optuna distribution (``tune.space.Space.optuna_space()``).
        metric: the result key to maximise/minimise (reported every epoch).
        mode: ``"max"`` or ``"min"``.
        seed: TPE sampler seed.
        storage_path: SQLite file for the study (None = in memory; tests).
        study_name: the study's name inside the storage.
        n_startup_trials: random trials before TPE takes over.
        step_key / finished_key: result keys for the step and the "finished by itself" flag.
    """

    # Set by the CLI around ``Tuner.restore(...).fit()``: where restored searchers find their
    # study when the recorded file is gone (the experiment folder was moved).
    study_path_on_restore: str | None = None

    def __init__(self, space: dict[str, BaseDistribution], metric: str, mode: str = "max", seed: int = 0,
                 storage_path: str | os.PathLike | None = None, study_name: str = "mmssl",
                 n_startup_trials: int = 10, step_key: str = STEP_KEY, finished_key: str = FINISHED_KEY):
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
        self._storage_path = os.path.abspath(os.fspath(storage_path)) if storage_path else None
        storage = optuna.storages.RDBStorage(storage_url(self._storage_path)) if self._storage_path else None
        self._step_key, self._finished_key = step_key, finished_key
        self._steps: dict[str, set[int]] = {}      # trial_id -> steps already reported
        self.outcomes: dict[str, tuple[str, str]] = {}  # trial_id -> (outcome, reason)
        super().__init__(space=space, metric=metric, mode=mode, sampler=sampler,
                         study_name=study_name, storage=storage)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    # -- Ray Searcher hooks ---------------------------------------------------
    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._steps:
            ot_trial.set_user_attr("ray_trial_id", trial_id)
            self._steps[trial_id] = set()
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        value = _finite((result or {}).get(self._metric))
        if result:
            self._report(trial_id, result)
        if error:
            state, reason = TrialState.FAIL, "the trial raised an error"
        elif value is None:
            shown = (result or {}).get(self._metric, "missing")
            state, reason = TrialState.FAIL, f"{self._metric} is {shown}"
        elif result.get(self._finished_key):
            state, reason = TrialState.COMPLETE, ""
        else:
            step = result.get(self._step_key, "?")
            state, reason = TrialState.PRUNED, f"stopped by the scheduler at {self._step_key} {step}"
        ot_trial.set_user_attr("outcome", OUTCOMES[state])
        ot_trial.set_user_attr("reason", reason)
        try:
            self._ot_study.tell(ot_trial, value if state == TrialState.COMPLETE else None, state=state)
        except Exception as exc:  # never let bookkeeping kill the experiment
            logger.warning("could not tell Optuna about trial %s: %s", trial_id, exc)
        self.outcomes[trial_id] = (OUTCOMES[state], reason)
        self._completed_trials.add(trial_id)

    def _report(self, trial_id: str, result: dict) -> None:
        value, step = _finite(result.get(self._metric)), result.get(self._step_key)
        if value is None or step is None:
            return
        steps = self._steps.setdefault(trial_id, set())
        if int(step) in steps:  # e.g. the "finished" report repeats the last epoch
            return
        self._ot_trials[trial_id].report(value, int(step))
        steps.add(int(step))

    # -- persistence ---------------------------------------------------------
    def restore(self, checkpoint_path: str) -> None:
        """Restore Ray's pickled searcher state, then reopen the study from its storage file."""
        super().restore(checkpoint_path)
        path = self._storage_path
        if not (path and os.path.exists(path)):  # the experiment folder moved
            path = type(self).study_path_on_restore
        if not path:
            return
        self._storage_path = os.path.abspath(path)
        self._storage = optuna.storages.RDBStorage(storage_url(self._storage_path))
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage,
                                           sampler=self._sampler)
        # running trials continue in their Optuna trial; finished ones are only looked up by id
        self._ot_trials = {tid: (t if tid in self._completed_trials else
                                 optuna.trial.Trial(self._ot_study, t._trial_id))
                           for tid, t in self._ot_trials.items()}


def _finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite number, else None."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def load_study(path: str | os.PathLike, study_name: str = "mmssl") -> optuna.Study:
    """Reload a finished (or running) search's study from its ``study.db``."""
    return optuna.load_study(study_name=study_name, storage=storage_url(path))


class ResumableLimiter(ConcurrencyLimiter):
    """Ray's ``ConcurrencyLimiter`` whose limit can be changed when an experiment is resumed.

    ``Tuner.restore`` brings back the limiter's saved state, ``max_concurrent``
    included (``SearchGenerator.restore_from_dir`` calls ``set_state``), so a new
    ``max_concurrent_trials`` would be silently ignored. Set the class attribute
    ``max_concurrent_on_restore`` before ``Tuner.restore`` to apply a new limit;
    ``None`` keeps the saved one.
    """

    max_concurrent_on_restore: int | None = None

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        k = type(self).max_concurrent_on_restore
        if k:
            self.max_concurrent = int(k)
