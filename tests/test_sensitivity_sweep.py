"""analysis/sensitivity.py part 2: one-at-a-time sweeps trained through tune.runner.run_fits.

A built search folder on tiny synthetic data (120 users x 80 items), 2 hyperparameters x
3 values x 2 seeds of 2 epochs, in a private local Ray with 2 CPUs; about a minute.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from analysis import sensitivity
from analysis.sweep import grid
from fake_search import PARAMS, importance_search

METRICS = ["val/recall@20", "val/ndcg@20", "test/recall@20", "test/ndcg@20"]


def _run(capsys, *argv):
    rc = sensitivity.run_main(sensitivity.main, list(argv), prog="sensitivity.py")
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def swept(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    folder = importance_search(root / "search", n=12)
    spec = root / "sweep.yaml"
    spec.write_text("sweep:\n  cl_weight: {n: 2}\n  dropout: {values: [0.0, 0.5]}\nseeds: 2\nepochs: 2\n"
                    "budget: {cpus_per_run: 1, max_concurrent: 2}\n")
    argv = ["--study", str(folder), "--sweep", str(spec), "--out", str(root / "out"), "--no-png"]
    rc = sensitivity.run_main(sensitivity.main, argv, prog="sensitivity.py")
    return {"rc": rc, "folder": folder, "argv": argv, "out": root / "out"}


def test_sweeps_csv_has_one_row_per_value_and_seed(swept):
    assert swept["rc"] == 0
    best = json.loads((swept["folder"] / "best.json").read_text())
    table = pd.read_csv(swept["out"] / "sweeps.csv")
    assert {"hyperparameter", "value", "seed", "run_key", "status", "best_epoch", "epochs_run", *METRICS} <= set(table)
    assert len(table) == 2 * 3 * 2 and (table["status"] == "ok").all()
    cl = sorted(table.loc[table["hyperparameter"] == "cl_weight", "value"].unique())
    assert cl == pytest.approx(sorted(grid(PARAMS["cl_weight"], best["params"]["cl_weight"], 2)))
    assert best["params"]["cl_weight"] in cl and 1e-3 in cl and 1.0 in cl  # both bounds and the best value
    dr = sorted(table.loc[table["hyperparameter"] == "dropout", "value"].unique())
    assert dr == pytest.approx(sorted([0.0, 0.5, best["params"]["dropout"]]))
    assert sorted(table["seed"].unique()) == [1, 2]
    # the best configuration at a seed is one run shared by both panels: 5 distinct runs per seed
    assert table["run_key"].nunique() == 10
    shared = table[table["is_best"]].groupby("seed")["run_key"].nunique()
    assert (shared == 1).all()
    assert table[METRICS].notna().all().all()


def test_each_run_is_the_best_config_with_one_value_changed_at_full_budget(swept):
    best = json.loads((swept["folder"] / "best.json").read_text())
    table = pd.read_csv(swept["out"] / "sweeps.csv")
    for row in table.itertuples():
        rec = json.loads((swept["out"] / "sweeps" / "runs" / f"{row.run_key}.json").read_text())
        cfg = rec["config"]
        assert cfg["epochs"] == 2 and cfg["seed"] == row.seed and cfg["patience"] == best["config"]["patience"]
        assert cfg[row.hyperparameter] == pytest.approx(row.value)
        for k in PARAMS:
            if k != row.hyperparameter:
                assert cfg[k] == pytest.approx(best["params"][k])
        assert rec["result"]["epochs_run"] == 2  # patience 0: no early stop; no scheduler either


def test_report_has_a_sweep_panel_per_swept_hyperparameter(swept):
    html = (swept["out"] / "report.html").read_text()
    assert 'id="fig-sweep_cl_weight"' in html and 'id="fig-sweep_dropout"' in html
    assert 'id="fig-sweep_n_layers"' not in html
    assert "seeds [1, 2]" in html and "10 distinct runs (0 failed" in html


def test_existing_runs_need_resume_and_are_never_rerun(swept, capsys):
    before = (swept["out"] / "sweeps.csv").read_text()
    rc, _, err = _run(capsys, *swept["argv"])
    assert rc == 2 and "--resume" in err and len(err.strip().splitlines()) == 1
    assert (swept["out"] / "sweeps.csv").read_text() == before  # nothing overwritten
    assert json.loads((swept["out"] / "sweeps" / "sweep.json").read_text())["seeds"] == [1, 2]
    rc, out, err = _run(capsys, *swept["argv"], "--resume", "--seeds", "3")
    assert rc == 0, err
    changed = [line for line in err.splitlines() if "differs from the one run before" in line]
    assert len(changed) == 1 and "seeds [1, 2] -> [1, 2, 3]" in changed[0], err    # a changed sweep is not silent
    assert "cl_weight" not in changed[0] and "dropout" not in changed[0]
    assert json.loads((swept["out"] / "sweeps" / "sweep.json").read_text())["seeds"] == [1, 2, 3]
    table = pd.read_csv(swept["out"] / "sweeps.csv")
    assert len(table) == 2 * 3 * 3
    assert table.loc[table["seed"] < 3, "cached"].all()          # finished runs reused
    assert not table.loc[table["seed"] == 3, "cached"].any()      # only the new seed trained
    assert out.count("run ") == 5                                 # 5 new distinct runs, one line each
    old = pd.read_csv(pd.io.common.StringIO(before))
    merged = table.merge(old, on=["hyperparameter", "value", "seed"], suffixes=("", "_old"))
    assert (merged["test/recall@20"] == merged["test/recall@20_old"]).all()


def test_resume_with_the_same_sweep_says_nothing_about_a_change(swept, capsys):
    rc, _, err = _run(capsys, *swept["argv"], "--resume", "--seeds", "3")
    assert rc == 0 and "differs" not in err, err


def test_part_1_alone_into_a_swept_folder_says_the_sweeps_are_not_in_the_report(swept, capsys):
    before = (swept["out"] / "sweeps.csv").read_text()
    argv = [a for a in swept["argv"] if a not in ("--sweep",) and not a.endswith("sweep.yaml")]
    rc, _, err = _run(capsys, *argv)
    assert rc == 0, err
    assert "sweeps.csv is from an earlier --sweep run and is not in this report" in err
    assert (swept["out"] / "sweeps.csv").read_text() == before            # kept, not lost


def test_changed_grids_are_named_and_a_damaged_record_is_replaced(swept, capsys, tmp_path):
    record = swept["out"] / "sweeps" / "sweep.json"
    saved = record.read_text()
    spec = tmp_path / "other.yaml"
    spec.write_text("sweep:\n  dropout: {values: [0.0, 0.25]}\nseeds: 3\nepochs: 2\n"
                    "budget: {cpus_per_run: 1, max_concurrent: 2}\n")
    argv = [a if not a.endswith("sweep.yaml") else str(spec) for a in swept["argv"]]
    rc, _, err = _run(capsys, *argv, "--resume")
    assert rc == 0, err
    line = [x for x in err.splitlines() if "differs from the one run before" in x][0]
    assert "cl_weight removed" in line and "seeds" not in line
    assert "dropout values [0.0, " in line and ", 0.5] -> [0.0, " in line and ", 0.25]" in line   # (+ the best value)
    record.write_text('{"grids": ')                                   # damaged: said, then replaced
    rc, _, err = _run(capsys, *argv, "--resume")
    assert rc == 0 and "could not be read" in err and "differs" not in err, err
    grids = json.loads(record.read_text())["grids"]
    assert list(grids) == ["dropout"] and 0.25 in grids["dropout"]
    record.write_text(saved)
