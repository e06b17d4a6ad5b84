"""``--resume --retry-failed``: a trial lost to a transient cause runs again, a diverged one does not.

In a local Ray (2 CPUs), with ``--max-failures 0``: one trial's worker process dies
right after its first checkpoint (testing hook ``MMSSL_TUNE_INJECT_CRASH``: a lost
worker), another trial diverges at epoch 1 (``MMSSL_TUNE_INJECT_DIVERGENCE``). Both end
``failed``. ``--resume`` alone keeps them failed; ``--resume --retry-failed`` re-runs
the lost one from its checkpoint to the end (a new Optuna trial with the same
parameters, ``retry_of`` the failed one) and keeps the diverged one failed. ~1 min.
"""
from __future__ import annotations

import os
import shutil

import optuna
import pandas as pd
import pytest
import ray

from mmssl.errors import ConfigError
from spaces import tiny_space
from tune import search
from tune.runner import init_ray
from tune.trainable import CRASH_ENV, FAULT_ENV

NUM_SAMPLES, EPOCHS = 4, 4
SPACE = tiny_space(epochs=EPOCHS, num_samples=NUM_SAMPLES, max_failures=0)


@pytest.fixture(scope="module")
def failed_search(tmp_path_factory):
    out = tmp_path_factory.mktemp("retry")
    for env, name in ((FAULT_ENV, "diverge"), (CRASH_ENV, "crash")):
        os.environ[env] = str(tmp_path_factory.mktemp(name))
    started, temp_dir = init_ray(num_cpus=2)
    (out / "space.yaml").write_text(SPACE)
    try:
        rc = search.main(["--space", str(out / "space.yaml"), "--out", str(out), "--name", "r"])
        first = pd.read_csv(out / "r" / "trials.csv")
        rc_plain = search.main(["--resume", "--out", str(out), "--name", "r"])
        plain = pd.read_csv(out / "r" / "trials.csv")
        rc_retry = search.main(["--resume", "--retry-failed", "--out", str(out), "--name", "r"])
    finally:
        for env in (FAULT_ENV, CRASH_ENV):
            os.environ.pop(env, None)
        if started:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
    return {"rc": (rc, rc_plain, rc_retry), "first": first, "plain": plain, "dir": out / "r"}


def _by_reason(trials: pd.DataFrame, text: str) -> pd.Series:
    rows = trials[trials["reason"].str.contains(text, regex=False)]
    assert len(rows) == 1, trials[["trial_id", "status", "reason"]]
    return rows.iloc[0]


def test_both_faults_fail_the_first_run(failed_search):
    first = failed_search["first"]
    assert failed_search["rc"] == (0, 0, 0)
    assert (first["status"] == "failed").sum() == 2
    lost = first[(first["status"] == "failed") & ~first["reason"].str.contains("DivergedError")]
    assert len(lost) == 1 and lost["epochs"].iloc[0] == 2  # the worker died at epoch 3
    assert "worker process has died" in lost["reason"].iloc[0]
    assert _by_reason(first, "DivergedError: training diverged at epoch 1")["status"] == "failed"
    plain = failed_search["plain"]  # --resume without --retry-failed changes nothing
    assert list(plain["status"]) == list(first["status"])


def test_retry_failed_reruns_the_lost_trial_from_its_checkpoint_only(failed_search):
    first, d = failed_search["first"], failed_search["dir"]
    lost_id = first[(first["status"] == "failed") & ~first["reason"].str.contains("Diverged")]["trial_id"].iloc[0]
    after = pd.read_csv(d / "trials.csv").set_index("trial_id")
    assert len(after) == NUM_SAMPLES
    assert after.loc[lost_id, "status"] == "completed" and after.loc[lost_id, "epochs"] == EPOCHS
    diverged = after[after["reason"].str.startswith("DivergedError", na=False)]
    assert len(diverged) == 1 and diverged["status"].iloc[0] == "failed"
    curves = pd.read_parquet(d / "curves.parquet")
    assert sorted(curves[curves["trial_id"] == lost_id]["epoch"]) == list(range(1, EPOCHS + 1))
    study = optuna.load_study(study_name="mmssl", storage=f"sqlite:///{d / 'study.db'}")
    assert len(study.trials) == NUM_SAMPLES + 1
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    mine = [t for t in study.trials if t.user_attrs.get("ray_trial_id") == lost_id]
    assert [t.state.name for t in mine] == ["FAIL", "COMPLETE"]
    old, new = mine
    assert new.user_attrs["retry_of"] == old.number and new.params == old.params
    assert sorted(new.intermediate_values) == list(range(1, EPOCHS + 1))
    assert after.loc[lost_id, "optuna_number"] == new.number and after.loc[lost_id, "optuna_state"] == "COMPLETE"


def test_retry_failed_needs_resume():
    with pytest.raises(ConfigError, match="--retry-failed only applies with --resume"):
        search.main(["--retry-failed", "--smoke-test"])
