"""The prune-aware OptunaSearch, driven directly with fake Ray results (no training, no Ray cluster)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from tune.searcher import FINISHED_KEY as FINISHED
from tune.searcher import PruneAwareOptunaSearch, close_unfinished, load_study

METRIC = "best/val/recall@20"
SPACE = {"cl_weight": FloatDistribution(1e-3, 1.0, log=True), "n_layers": IntDistribution(1, 3)}


def results(values, finished_last=False, start=1):
    out = []
    for i, v in enumerate(values):
        r = {"epoch": start + i, "training_iteration": start + i, METRIC: v, "trial/finished": 0.0}
        out.append(r)
    if finished_last:
        out[-1]["trial/finished"] = 1.0
    return out


def drive(searcher, trial_id, rs, complete_with_last=True, error=False, stopped_by_scheduler=False):
    """Mimic TuneController: results go to on_trial_result, except the one a scheduler STOPs on."""
    assert searcher.suggest(trial_id) is not None
    shown = rs[:-1] if stopped_by_scheduler else rs
    for r in shown:
        searcher.on_trial_result(trial_id, dict(r))
    last = dict(rs[-1], done=True) if (rs and complete_with_last) else None
    searcher.on_trial_complete(trial_id, result=last, error=error)


@pytest.fixture
def searcher(tmp_path):
    return PruneAwareOptunaSearch(SPACE, metric=METRIC, mode="max", seed=3,
                                  storage_path=tmp_path / "study.db", study_name="t", n_startup_trials=2)


def frozen(searcher, trial_id):
    (t,) = [t for t in searcher.study.get_trials() if t.user_attrs.get("ray_trial_id") == trial_id]
    return t


def test_scheduler_stopped_trial_is_pruned_with_intermediate_values(searcher):
    drive(searcher, "a", results([0.1, 0.2, 0.15]), stopped_by_scheduler=True)
    t = frozen(searcher, "a")
    assert t.state == TrialState.PRUNED
    # the rung result that triggered the stop (never passed to on_trial_result) is kept too
    assert t.intermediate_values == {1: 0.1, 2: 0.2, 3: 0.15}
    assert t.value == pytest.approx(0.15)  # Optuna: a pruned trial's value is its last intermediate
    assert t.user_attrs["outcome"] == "stopped_early"
    assert searcher.outcomes["a"][0] == "stopped_early"


def test_finished_at_max_epochs_is_complete(searcher):
    # at max_t ASHA also says STOP; the trainable's flag on that report makes it COMPLETE
    drive(searcher, "b", results([0.1, 0.3, 0.4], finished_last=True), stopped_by_scheduler=True)
    t = frozen(searcher, "b")
    assert t.state == TrialState.COMPLETE
    assert t.value == pytest.approx(0.4)
    assert t.intermediate_values == {1: 0.1, 2: 0.3, 3: 0.4}


def test_patience_early_stop_is_complete(searcher):
    # fit stopped itself; the trainable sends one more report (same epoch) flagged finished
    rs = results([0.3, 0.25, 0.2])
    rs.append(dict(rs[-1], **{"trial/finished": 1.0, "training_iteration": 4}))
    drive(searcher, "c", rs)
    t = frozen(searcher, "c")
    assert t.state == TrialState.COMPLETE and t.value == pytest.approx(0.2)
    assert t.intermediate_values == {1: 0.3, 2: 0.25, 3: 0.2}  # the repeated epoch is not duplicated


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_nan_or_missing_metric_is_fail(searcher, bad):
    rs = results([0.1, 0.2], finished_last=True)
    if bad is None:
        del rs[-1][METRIC]
    else:
        rs[-1][METRIC] = bad
    drive(searcher, "d", rs)
    t = frozen(searcher, "d")
    assert t.state == TrialState.FAIL and t.value is None
    assert t.intermediate_values == {1: 0.1}  # the NaN epoch is not reported
    assert METRIC in t.user_attrs["reason"]


def test_error_is_fail(searcher):
    drive(searcher, "e", results([0.1, 0.2]), complete_with_last=False, error=True)
    t = frozen(searcher, "e")
    assert t.state == TrialState.FAIL
    assert t.user_attrs["outcome"] == "failed"
    assert t.intermediate_values == {1: 0.1, 2: 0.2}


def test_stock_searcher_would_say_complete(tmp_path):
    """The defect this class exists for: Ray's OptunaSearch tells COMPLETE for an ASHA-stopped trial."""
    stock = OptunaSearch(SPACE, metric=METRIC, mode="max", seed=3)
    rs = results([0.1, 0.2, 0.15])
    stock.suggest("x")
    for r in rs[:-1]:
        stock.on_trial_result("x", r)
    stock.on_trial_complete("x", result=dict(rs[-1], done=True))
    assert stock._ot_study.get_trials()[0].state == TrialState.COMPLETE


def test_study_persisted_and_study_continues_after_failures(searcher, tmp_path):
    drive(searcher, "f1", results([0.1]), complete_with_last=False, error=True)
    drive(searcher, "f2", results([0.2, 0.3], finished_last=True))
    drive(searcher, "f3", results([0.05, 0.01]), stopped_by_scheduler=True)
    drive(searcher, "f4", results([0.5], finished_last=True))  # TPE still suggests after FAIL/PRUNED
    study = load_study(tmp_path / "study.db", study_name="t")
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert study.best_value == pytest.approx(0.5)
    assert all(set(t.params) == set(SPACE) for t in study.get_trials())


def test_seeded_sampler_is_reproducible(tmp_path):
    def params(seed, name):
        s = PruneAwareOptunaSearch(SPACE, metric=METRIC, seed=seed, storage_path=tmp_path / f"{name}.db")
        return [s.suggest(f"t{i}") for i in range(3)]
    assert params(7, "a") == params(7, "b")
    assert params(7, "c") != params(8, "d")


def test_restore_reopens_the_study_from_storage(searcher, tmp_path):
    drive(searcher, "g1", results([0.2, 0.3], finished_last=True))
    searcher.suggest("g2")
    searcher.on_trial_result("g2", results([0.1])[0])
    searcher.save(str(tmp_path / "searcher.pkl"))

    fresh = PruneAwareOptunaSearch(SPACE, metric=METRIC, seed=3, storage_path=tmp_path / "other.db",
                                   study_name="t")
    fresh.restore(str(tmp_path / "searcher.pkl"))
    assert fresh._storage_path == str(tmp_path / "study.db")
    # the running trial continues in the same Optuna trial, with its earlier values
    fresh.on_trial_result("g2", results([0.1, 0.25])[1])
    fresh.on_trial_complete("g2", result=dict(results([0.1, 0.25, 0.05])[2]), error=False)
    t = [t for t in load_study(tmp_path / "study.db", "t").get_trials()
         if t.user_attrs.get("ray_trial_id") == "g2"][0]
    assert t.state == TrialState.PRUNED and t.intermediate_values == {1: 0.1, 2: 0.25, 3: 0.05}
    assert fresh.study.best_value == pytest.approx(0.3)


def _restored(tmp_path, tune_trials):
    fresh = PruneAwareOptunaSearch(SPACE, metric=METRIC, seed=3, storage_path=tmp_path / "study.db", study_name="t")
    PruneAwareOptunaSearch.tune_trials_on_restore = tune_trials
    try:
        fresh.restore(str(tmp_path / "searcher.pkl"))
    finally:
        PruneAwareOptunaSearch.tune_trials_on_restore = None
    return fresh


def test_restore_adopts_a_trial_the_killed_driver_asked_for_but_tune_never_recorded(searcher, tmp_path):
    searcher.suggest("a")
    searcher.save(str(tmp_path / "searcher.pkl"))  # the snapshot
    orphan_params = searcher.suggest("b")           # asked, then the driver was killed
    searcher.on_trial_result("b", results([0.2])[0])
    fresh = _restored(tmp_path, tune_trials={"a"})
    assert fresh.suggest("c") == orphan_params      # Tune's next new trial takes it over
    drive_rest = results([0.2, 0.3], finished_last=True)
    for r in drive_rest[:-1]:
        fresh.on_trial_result("c", dict(r))
    fresh.on_trial_complete("c", result=dict(drive_rest[-1], done=True))
    study = load_study(tmp_path / "study.db", "t")
    assert len(study.trials) == 2                    # one per Tune trial: a, c
    assert sorted(t.user_attrs["ray_trial_id"] for t in study.trials) == ["a", "c"]
    assert frozen(fresh, "c").state == TrialState.COMPLETE and frozen(fresh, "c").intermediate_values == {1: 0.2, 2: 0.3}


def test_restore_adopts_a_trial_killed_inside_optunas_ask(searcher, tmp_path):
    """SIGKILL between Optuna creating the trial and the searcher linking it: no ray_trial_id,
    only some parameters. It is still adopted (the rest sampled), not left to end as FAIL."""
    searcher.suggest("a")
    searcher.save(str(tmp_path / "searcher.pkl"))
    half = searcher.study.ask()                                  # what a killed ask leaves behind
    half.suggest_float("cl_weight", 1e-3, 1.0, log=True)
    fresh = _restored(tmp_path, tune_trials={"a"})
    params = fresh.suggest("c")
    assert set(params) == set(SPACE) and params["cl_weight"] == half.params["cl_weight"]
    assert 1 <= params["n_layers"] <= 3
    study = load_study(tmp_path / "study.db", "t")
    assert len(study.trials) == 2 and {t.user_attrs.get("ray_trial_id") for t in study.trials} == {"a", "c"}
    assert fresh.suggest("d") is not None and len(load_study(tmp_path / "study.db", "t").trials) == 3


def test_restore_links_a_trial_tune_saved_but_the_searcher_pickle_missed(searcher, tmp_path):
    searcher.save(str(tmp_path / "searcher.pkl"))
    searcher.suggest("a")                            # Tune's state has it, the searcher's pickle not
    fresh = _restored(tmp_path, tune_trials={"a"})
    drive_rest = results([0.1, 0.4], finished_last=True)
    fresh.on_trial_result("a", dict(drive_rest[0]))
    fresh.on_trial_complete("a", result=dict(drive_rest[1], done=True))
    assert frozen(fresh, "a").state == TrialState.COMPLETE
    assert len(load_study(tmp_path / "study.db", "t").trials) == 1


def test_restore_keeps_the_outcome_of_a_trial_that_ended_after_the_snapshot(searcher, tmp_path):
    searcher.suggest("a")
    searcher.save(str(tmp_path / "searcher.pkl"))
    for r in results([0.1, 0.2], finished_last=True):
        searcher.on_trial_result("a", dict(r))
    searcher.on_trial_complete("a", result=dict(results([0.1, 0.2], finished_last=True)[-1], done=True))
    fresh = _restored(tmp_path, tune_trials={"a"})
    fresh.on_trial_result("a", dict(results([0.1, 0.2])[1]))  # Tune re-runs it from its checkpoint
    fresh.on_trial_complete("a", result=dict(results([0.1, 0.2])[1], done=True))  # would say PRUNED
    assert frozen(fresh, "a").state == TrialState.COMPLETE
    assert len(load_study(tmp_path / "study.db", "t").trials) == 1


def test_a_failed_trial_run_again_gets_a_new_optuna_trial(searcher, tmp_path):
    searcher.suggest("a")
    searcher.on_trial_result("a", dict(results([0.1, 0.2])[0]))
    searcher.on_trial_result("a", dict(results([0.1, 0.2])[1]))
    searcher.on_trial_complete("a", error=True)      # its worker died
    rerun = results([0.1, 0.2, 0.3, 0.35], finished_last=True)
    searcher.on_trial_result("a", dict(rerun[2]))    # --retry-failed: from its checkpoint at epoch 2
    searcher.on_trial_complete("a", result=dict(rerun[3], done=True))
    old, new = sorted((t for t in searcher.study.trials if t.user_attrs["ray_trial_id"] == "a"), key=lambda t: t.number)
    assert (old.state, new.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert new.params == old.params and new.user_attrs["retry_of"] == old.number
    assert new.intermediate_values == {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.35}


def test_a_diverged_report_is_a_failure_with_its_reason(searcher):
    rs = results([0.1, 0.2])
    rs[-1].update({"trial/diverged": 1.0, "trial/reason": "DivergedError: training diverged at epoch 2: x = nan"})
    drive(searcher, "d", rs, stopped_by_scheduler=True)
    t = frozen(searcher, "d")
    assert t.state == TrialState.FAIL and t.user_attrs["reason"].startswith("DivergedError: training diverged")


def test_close_unfinished_follows_the_final_table(searcher):
    searcher.suggest("a")
    searcher.on_trial_result("a", dict(results([0.1, 0.2])[1]))
    searcher.suggest("b")
    searcher.suggest("ghost")
    n = close_unfinished(searcher.study, {"a": ("completed", "max epochs", 0.3, 4), "b": ("stopped_early", "ASHA", 0.1, 1)})
    assert n == 3
    by = {t.user_attrs["ray_trial_id"]: t for t in searcher.study.trials}
    assert by["a"].state == TrialState.COMPLETE and by["a"].value == pytest.approx(0.3) and 4 in by["a"].intermediate_values
    assert by["b"].state == TrialState.PRUNED
    assert by["ghost"].state == TrialState.FAIL and by["ghost"].user_attrs["reason"].startswith("orphan")
    assert close_unfinished(searcher.study, {}) == 0


# --- the trainable's side of the contract (fake fit, fake tune.report; no Ray) -----------------

class FakeTune:
    """Stands in for ray.tune.report / get_checkpoint inside tune.trainable."""

    def __init__(self, checkpoint=None):
        self.reports, self.checkpoints, self._ckpt = [], [], checkpoint

    def report(self, metrics, checkpoint=None):
        self.reports.append(dict(metrics))
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                self.checkpoints.append(sorted(p.name for p in Path(d).iterdir()))

    def get_checkpoint(self):
        return self._ckpt


def fake_fit(recalls, stop_after=None):
    """A fit that reports ``recalls`` as val/recall@20, one per epoch, then stops (patience) or ends."""
    def fit(cfg, data, on_epoch=None, resume_from=None):
        start = 0 if resume_from is None else int((Path(resume_from) / "checkpoint.pt").read_text())
        best = float("-inf")
        for e in range(1, start + 1):
            best = max(best, recalls[e - 1])
        for e in range(start + 1, min(cfg.epochs, stop_after or cfg.epochs) + 1):
            best = max(best, recalls[e - 1])
            m = {"epoch": e, "train/loss": 1.0 / e, "val/recall@20": recalls[e - 1], "val/ndcg@20": recalls[e - 1] / 2,
                 "best/val/recall@20": best}

            def save(d, e=e):
                p = Path(d) / "checkpoint.pt"
                p.write_text(str(e))
                return p
            on_epoch(e, m, save)
        return {}
    return fit


def run_trainable(monkeypatch, recalls, epochs, stop_after=None, checkpoint=None, metric="val/recall@20"):
    import tune.trainable as tr
    fake = FakeTune(checkpoint)
    monkeypatch.setattr(tr, "fit", fake_fit(recalls, stop_after))
    monkeypatch.setattr(tr.tune, "report", fake.report)
    monkeypatch.setattr(tr.tune, "get_checkpoint", fake.get_checkpoint)
    monkeypatch.setattr(tr, "trial_device", lambda: "cpu")
    monkeypatch.setattr(tr.torch, "set_num_threads", lambda n: None)  # keep the test process's threads
    tr.train_mmssl({"cl_weight": 0.1}, data=None, base={"epochs": epochs}, metric=metric,
                   checkpoint_every=2, cpus_per_trial=1)
    return fake


def test_trainable_flags_the_max_epoch_report_as_finished(monkeypatch):
    fake = run_trainable(monkeypatch, [0.1, 0.3, 0.2, 0.25], epochs=4)
    assert [r["epoch"] for r in fake.reports] == [1, 2, 3, 4]
    assert [r[FINISHED] for r in fake.reports] == [0.0, 0.0, 0.0, 1.0]
    assert [r[METRIC] for r in fake.reports] == [0.1, 0.3, 0.3, 0.3]
    assert [r["best/epoch"] for r in fake.reports] == [1, 2, 2, 2]
    assert fake.checkpoints == [["checkpoint.pt", "tune_state.json"]]  # epoch 2 only (4 is the end)


def test_trainable_sends_a_finished_report_after_a_patience_stop(monkeypatch):
    fake = run_trainable(monkeypatch, [0.1, 0.3, 0.2, 0.25, 0.2, 0.1], epochs=6, stop_after=4)
    assert [r["epoch"] for r in fake.reports] == [1, 2, 3, 4, 4]
    assert [r[FINISHED] for r in fake.reports] == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert fake.reports[-1][METRIC] == 0.3


def test_trainable_best_metric_follows_the_selected_epoch(monkeypatch):
    fake = run_trainable(monkeypatch, [0.1, 0.3, 0.2], epochs=3, metric="val/ndcg@20")
    assert [r["best/val/ndcg@20"] for r in fake.reports] == [0.05, 0.15, 0.15]


def test_trainable_resumes_from_the_tune_checkpoint(monkeypatch, tmp_path):
    from ray.tune import Checkpoint
    (tmp_path / "checkpoint.pt").write_text("2")
    (tmp_path / "tune_state.json").write_text(json.dumps(
        {"best_select": 0.3, "best_epoch": 2, "best_value": 0.3, "last": None}))
    fake = run_trainable(monkeypatch, [0.1, 0.3, 0.2, 0.25], epochs=4, checkpoint=Checkpoint.from_directory(tmp_path))
    assert [r["epoch"] for r in fake.reports] == [3, 4]
    assert [r["best/epoch"] for r in fake.reports] == [2, 2]


def test_trainable_reports_a_divergence_and_returns(monkeypatch):
    import tune.trainable as tr
    from mmssl.errors import DivergedError
    fake = FakeTune()

    def diverging_fit(cfg, data, on_epoch=None, resume_from=None):
        on_epoch(1, {"val/recall@20": 0.1, "best/val/recall@20": 0.1}, lambda d: None)
        raise DivergedError(2, "train/loss_d")

    monkeypatch.setattr(tr, "fit", diverging_fit)
    monkeypatch.setattr(tr.tune, "report", fake.report)
    monkeypatch.setattr(tr.tune, "get_checkpoint", fake.get_checkpoint)
    monkeypatch.setattr(tr.torch, "set_num_threads", lambda n: None)
    tr.train_mmssl({"cl_weight": 0.1}, data=None, base={"epochs": 4}, metric="val/recall@20",
                   checkpoint_every=2, cpus_per_trial=1)  # returns: no exception for Tune to retry
    last = fake.reports[-1]
    assert last["trial/diverged"] == 1.0 and last["epoch"] == 2 and last[FINISHED] == 0.0
    assert last["trial/reason"] == "DivergedError: training diverged at epoch 2: train/loss_d = nan"
    assert last["trial/device"] == "cpu" and "trial/node_id" in last
