"""A prune-aware Ray Tune ``OptunaSearch``: ASHA-stopped trials reach Optuna as PRUNED.

Ray's stock ``OptunaSearch`` (ray 2.60, ``ray/tune/search/optuna/optuna_search.py``)
tells Optuna COMPLETE for every trial that ends with a result, including trials
that ASHA stopped at a low rung. Their truncated values then enter TPE's "good"
and "bad" groups as if they were final, and Optuna's importance and plots treat
them as finished runs. This subclass tells Optuna what actually happened:

* every result: ``trial.report(value, step=result["epoch"])`` (the stock class
  uses ``training_iteration``; ours is the epoch, ASHA's ``time_attr``);
* on completion, from what Ray passes to ``on_trial_complete(trial_id, result, error)``:

  - ``error=True`` (the worker/node died beyond ``max_failures``, a crash) -> FAIL
  - the last result carries ``trial/diverged`` (a NaN/inf loss)         -> FAIL
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
from ray.tune.utils.util import unflatten_dict

logger = logging.getLogger(__name__)

STEP_KEY = "epoch"
FINISHED_KEY = "trial/finished"
DIVERGED_KEY = "trial/diverged"  # the trainable's last report of a diverged trial (with REASON_KEY)
REASON_KEY = "trial/reason"
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
    # Set by ``tune.runner.restore_tuner``: the trial ids in Tune's restored experiment state.
    tune_trials_on_restore: set[str] | None = None

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
        orphans = getattr(self, "_orphans", [])
        if trial_id not in self._ot_trials and orphans:  # adopt a trial the killed driver had asked for
            ot_trial = orphans.pop(0)
            self._ot_trials[trial_id] = ot_trial
            ot_trial.set_user_attr("ray_trial_id", trial_id)
            frozen = self._ot_study._storage.get_trial(ot_trial._trial_id)
            if set(frozen.params) != set(self._space):   # killed half-way through its ask: sample the rest
                _suggest_missing(ot_trial, self._space, frozen.params)
                frozen = self._ot_study._storage.get_trial(ot_trial._trial_id)
            self._steps[trial_id] = set(frozen.intermediate_values)
            return unflatten_dict(frozen.params)
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._steps:
            ot_trial.set_user_attr("ray_trial_id", trial_id)
            self._steps[trial_id] = set()
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials:
            self._maybe_reopen(trial_id, result)
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._report(trial_id, result)

    def _maybe_reopen(self, trial_id: str, result: dict) -> None:
        """A FAILed trial that runs again (``--resume --retry-failed``) gets a new Optuna trial.

        Optuna cannot reopen a finished trial: the new one has the same parameters, the
        old one's values before the retry's first epoch, ``ray_trial_id`` and
        ``retry_of`` (the failed trial's number). Trials re-run for another reason
        (Tune's snapshot predates their end) keep their recorded outcome.
        """
        old = self._ot_trials.get(trial_id)
        if old is None:
            return
        frozen = self._ot_study._storage.get_trial(old._trial_id)
        if frozen.state != TrialState.FAIL:
            return
        self._ot_study.enqueue_trial(frozen.params, user_attrs={"retry_of": frozen.number}, skip_if_exists=False)
        new = self._ot_study.ask(fixed_distributions=self._space)
        new.set_user_attr("ray_trial_id", trial_id)
        first = int(result.get(self._step_key, 1))
        for step, value in sorted(frozen.intermediate_values.items()):
            if step < first:
                new.report(value, step)
        self._ot_trials[trial_id] = new
        self._steps[trial_id] = {s for s in frozen.intermediate_values if s < first}
        self._completed_trials.discard(trial_id)
        self.outcomes.pop(trial_id, None)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        value = _finite((result or {}).get(self._metric))
        if result:
            self._report(trial_id, result)
        if error:
            state, reason = TrialState.FAIL, "the trial raised an error"
        elif (result or {}).get(DIVERGED_KEY):
            state, reason = TrialState.FAIL, str(result.get(REASON_KEY, "diverged"))
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
        self.reconcile(type(self).tune_trials_on_restore)

    def reconcile(self, tune_trials: set[str] | None = None) -> None:
        """Make the searcher agree with its study and with Tune after a driver was killed.

        Tune saves its experiment state, then the searcher's pickle, every few seconds;
        the study is written at once. A driver killed with SIGKILL can therefore leave:

        * a study trial finished after the pickle was saved -> marked completed here
          (its outcome stays the one in ``study.db``);
        * a study trial the pickle does not know but Tune does (killed between the two
          saves) -> linked back to its Tune trial by its ``ray_trial_id`` attribute;
        * a RUNNING study trial Tune never recorded (asked for, then the driver died)
          -> an orphan: :meth:`suggest` hands it to the next new Tune trial, with its
          parameters, so that the study keeps one trial per Tune trial. That includes a
          trial killed inside Optuna's ``ask``: no ``ray_trial_id`` yet, and only some of
          its parameters (the rest are sampled on adoption).

        ``tune_trials``: the trial ids in Tune's restored state (None: unknown, no orphans).
        """
        storage = self._ot_study._storage
        frozen = {t._trial_id: t for t in self._ot_study.get_trials(deepcopy=False)}
        by_ray = {t.user_attrs.get("ray_trial_id"): t for t in frozen.values()}
        known = {tid: t._trial_id for tid, t in self._ot_trials.items()}
        known.update({tid: t._trial_id for tid, t in by_ray.items() if tid and tid not in known})
        self._ot_trials, self._orphans = {}, []
        for tid, ot_id in known.items():
            ft = frozen.get(ot_id) or storage.get_trial(ot_id)
            if ft.state.is_finished():
                self._completed_trials.add(tid)
                self._ot_trials[tid] = optuna.trial.Trial(self._ot_study, ot_id)  # looked up by id only
            elif tune_trials is not None and tid not in tune_trials and tid not in self._completed_trials:
                self._orphans.append(optuna.trial.Trial(self._ot_study, ot_id))
            else:  # running: continues in its Optuna trial
                self._ot_trials[tid] = optuna.trial.Trial(self._ot_study, ot_id)
                self._steps.setdefault(tid, set()).update(ft.intermediate_values)
        if tune_trials is not None:  # asked for, killed before it was linked to any Tune trial
            linked = set(known.values())
            self._orphans += [optuna.trial.Trial(self._ot_study, t._trial_id) for t in frozen.values()
                              if t.state == optuna.trial.TrialState.RUNNING and t._trial_id not in linked]
        self._orphans.sort(key=lambda t: t.number)


def _suggest_missing(trial: optuna.trial.Trial, space: dict[str, Any], have: dict[str, Any]) -> None:
    """Sample, with the study's sampler, the parameters of ``space`` (name -> Optuna distribution)
    that ``trial`` lacks (``have``): Optuna's public ``suggest_*`` on the RUNNING trial.
    Raises TypeError for a distribution type Optuna's suggest API does not cover."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    for name, dist in space.items():
        if name in have:
            continue
        if isinstance(dist, FloatDistribution):
            trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
        elif isinstance(dist, IntDistribution):
            trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        elif isinstance(dist, CategoricalDistribution):
            trial.suggest_categorical(name, dist.choices)
        else:
            raise TypeError(f"{name}: cannot sample a {type(dist).__name__}")


def _finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite number, else None."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def close_unfinished(study: optuna.Study, outcomes: dict[str, tuple[str, str, float, int]]) -> int:
    """End every study trial still RUNNING after the search, as Tune's final table says.

    ``outcomes``: Tune trial id -> (status, reason, objective, epochs) from ``trials.csv``.
    Tune does not always tell the searcher that a trial ended: a trial re-run by
    ``--retry-failed`` is no longer "live" in Tune's ``ConcurrencyLimiter``, which then
    drops its completion. Such a trial is told its status (COMPLETE with its objective,
    reported at its last epoch, PRUNED or FAIL). A trial Tune never ran (asked for by a
    driver that was then killed, and not adopted on ``--resume``) becomes FAIL
    ``orphan``. Returns how many trials were closed.
    """
    states = {"completed": TrialState.COMPLETE, "stopped_early": TrialState.PRUNED, "failed": TrialState.FAIL}
    orphan = ("failed", "orphan: never run by Tune (its driver was killed)", math.nan, 0)
    closed = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        status, reason, objective, epochs = outcomes.get(t.user_attrs.get("ray_trial_id"), orphan)
        value = _finite(objective)
        state = states[status] if value is not None or status == "failed" else TrialState.FAIL
        if value is not None and epochs and int(epochs) not in t.intermediate_values:
            study._storage.set_trial_intermediate_value(t._trial_id, int(epochs), value)
        study._storage.set_trial_user_attr(t._trial_id, "outcome", OUTCOMES[state])
        study._storage.set_trial_user_attr(t._trial_id, "reason", "" if state == TrialState.COMPLETE else reason)
        study.tell(t.number, value if state == TrialState.COMPLETE else None, state=state)
        closed += 1
    return closed


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
