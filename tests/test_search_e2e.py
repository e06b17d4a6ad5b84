"""End to end: the real ``tune/search.py --smoke-test`` in a local Ray (2 CPUs), plus bad input.

One trial is made to diverge through the trainable's testing hook
(``MMSSL_TUNE_INJECT_DIVERGENCE``): it must be reported as failed with its reason,
told to Optuna as FAIL, and the search must go on. Takes about 1.5-2.5 minutes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray

from tune import search
from tune.runner import init_ray
from tune.trainable import FAULT_ENV

REPO = Path(__file__).resolve().parents[1]
NUM_SAMPLES = search.SMOKE["num_samples"]


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    fault_dir = tmp_path_factory.mktemp("fault")
    os.environ[FAULT_ENV] = str(fault_dir)  # before ray.init: the workers inherit it
    started, temp_dir = init_ray(num_cpus=2)
    yield fault_dir
    os.environ.pop(FAULT_ENV, None)
    if started:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def smoke(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    t0 = time.time()
    rc = search.main(["--smoke-test", "--out", str(out), "--name", "smoke"])
    return {"rc": rc, "dir": out / "smoke", "out": out, "seconds": time.time() - t0}


def test_smoke_runs_and_writes_every_output(smoke):
    assert smoke["rc"] == 0
    d = smoke["dir"]
    for name in ("trials.csv", "trials.parquet", "curves.parquet", "best.json", "study.db", "summary.md",
                 "search.json", "tuner.pkl"):
        assert (d / name).is_file(), name
    assert list(d.glob("experiment_state-*.json")), "Ray's experiment state"
    assert smoke["seconds"] < 240, f"smoke test took {smoke['seconds']:.0f} s"


def test_trials_table(smoke):
    trials = pd.read_csv(smoke["dir"] / "trials.csv")
    assert len(trials) == NUM_SAMPLES
    assert pd.read_parquet(smoke["dir"] / "trials.parquet").shape == trials.shape
    assert set(trials["status"]) <= {"completed", "stopped_early", "failed"}
    assert (trials["status"] == "stopped_early").sum() >= 1
    assert (trials["status"] == "completed").sum() >= 1
    for key in ("gp_weight", "cl_weight", "adv_weight", "l2_weight", "gumbel_tau", "cl_tau", "aug_weight",
                "fusion_weight", "modal_id_weight", "topk_rate", "val/recall@20", "val/ndcg@20", "epochs",
                "seconds", "reason", "trial_id"):
        assert key in trials.columns, key
    stopped = trials[trials["status"] == "stopped_early"]
    assert (stopped["epochs"] < search.SMOKE["max_epochs"]).all()
    done = trials[trials["status"] != "failed"]
    assert done["val/recall@20"].between(0, 1).all() and done["objective"].notna().all()


def test_diverged_trial_is_failed_with_reason_and_the_search_goes_on(smoke):
    trials = pd.read_csv(smoke["dir"] / "trials.csv")
    failed = trials[trials["status"] == "failed"]
    assert len(failed) == 1
    assert failed["reason"].iloc[0].startswith("DivergedError: training diverged at epoch 1")
    assert failed["optuna_state"].iloc[0] == "FAIL"
    # trials created after the failure still ran
    assert trials["optuna_number"].max() == NUM_SAMPLES - 1


def test_study_has_pruned_trials_matching_the_table(smoke):
    study = optuna.load_study(study_name="mmssl", storage=f"sqlite:///{smoke['dir'] / 'study.db'}")
    states = [t.state for t in study.trials]
    assert len(states) == NUM_SAMPLES
    assert states.count(optuna.trial.TrialState.PRUNED) >= 1
    trials = pd.read_csv(smoke["dir"] / "trials.csv")
    expect = {"completed": "COMPLETE", "stopped_early": "PRUNED", "failed": "FAIL"}
    by_id = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    for _, row in trials.iterrows():
        t = by_id[row["trial_id"]]
        assert t.state.name == expect[row["status"]]
        if row["status"] == "stopped_early":  # intermediate values up to the rung where ASHA stopped it
            assert max(t.intermediate_values) == row["epochs"]


def test_curves_have_every_reported_epoch(smoke):
    curves = pd.read_parquet(smoke["dir"] / "curves.parquet")
    trials = pd.read_csv(smoke["dir"] / "trials.csv")
    assert {"trial_id", "epoch", "train/loss", "val/recall@20", "best/val/recall@20"} <= set(curves.columns)
    per_trial = curves.groupby("trial_id")["epoch"].agg(["count", "max"])
    for _, row in trials.iterrows():
        if row["epochs"]:
            assert per_trial.loc[row["trial_id"], "count"] == row["epochs"] == per_trial.loc[row["trial_id"], "max"]
    assert not curves.duplicated(["trial_id", "epoch"]).any()


def test_best_json_has_the_final_seeds_test_metrics(smoke):
    best = json.loads((smoke["dir"] / "best.json").read_text())
    trials = pd.read_csv(smoke["dir"] / "trials.csv")
    ok = trials[trials["status"] != "failed"]
    assert best["trial_id"] == ok.loc[ok["objective"].idxmax(), "trial_id"]
    assert best["val"]["val/recall@20"] == pytest.approx(ok["objective"].max())
    space = json.loads((smoke["dir"] / "search.json").read_text())["space"]
    assert set(best["params"]) == set(space["params"]) and len(best["params"]) == 10
    assert best["config"]["epochs"] == search.SMOKE["max_epochs"]
    final = best["final"]
    assert [s["seed"] for s in final["seeds"]] == [1, 2]
    for s in final["seeds"]:
        assert 0 <= s["test/recall@20"] <= 1 and 0 <= s["test/ndcg@20"] <= 1
    values = [s["test/recall@20"] for s in final["seeds"]]
    assert final["mean"]["test/recall@20"] == pytest.approx(sum(values) / 2)
    assert final["std"]["test/recall@20"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    cost = best["cost"]
    assert cost["trial_epochs_run"] == int(trials["epochs"].sum()) < cost["trial_epochs_budget"]
    summary = (smoke["dir"] / "summary.md").read_text()
    assert "Cost ledger" in summary and "mean ± std" in summary and "saved by ASHA" in summary


def test_resume_of_a_finished_search_adds_nothing(smoke, capsys):
    d = smoke["dir"]
    before = pd.read_csv(d / "trials.csv")
    cached = {p.name: p.stat().st_mtime for p in (d / "final").glob("seed_*.json")}
    (d / "trials.csv").unlink()
    rc = search.main(["--resume", "--out", str(smoke["out"]), "--name", "smoke"])
    assert rc == 0
    assert f"is finished ({NUM_SAMPLES}/{NUM_SAMPLES} trials ended); rebuilding its outputs" in capsys.readouterr().out
    after = pd.read_csv(d / "trials.csv")
    assert list(after["trial_id"]) == list(before["trial_id"])
    assert list(after["status"]) == list(before["status"])
    study = optuna.load_study(study_name="mmssl", storage=f"sqlite:///{d / 'study.db'}")
    assert len(study.trials) == NUM_SAMPLES
    assert {p.name: p.stat().st_mtime for p in (d / "final").glob("seed_*.json")} == cached  # not re-run


def test_interrupt_during_the_final_retraining_says_how_to_resume(smoke, monkeypatch, capsys):
    """Ctrl-C / SIGTERM while the final seeds train: exit 130 with the --resume line, and Tune's
    SIGINT handler (left installed by tuner.fit) is gone, so a later Ctrl-C is not swallowed."""
    import signal

    import tune.runner

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune.runner, "run_final", interrupted)
    before = signal.getsignal(signal.SIGINT)
    rc = search.main(["--resume", "--out", str(smoke["out"]), "--name", "smoke"])
    err = capsys.readouterr().err
    assert rc == 130
    assert "interrupted during the final re-training" in err
    assert f"continue with: python tune/search.py --resume --out {smoke['out']} --name smoke" in err
    assert signal.getsignal(signal.SIGINT) is before


def test_bad_space_file_is_one_line_exit_2_before_ray(tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text("search:\n  cl_weight: {dist: loguniform, low: 0.0, high: 1.0}\n")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "tune/search.py", "--space", str(bad), "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "search.cl_weight" in lines[0] and "log range" in lines[0]
    assert not list(tmp_path.glob("*/search.json"))  # nothing started
    assert time.time() - t0 < 60
