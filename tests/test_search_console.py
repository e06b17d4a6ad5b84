"""A real (tiny) search in a subprocess (issue 7, parts 4 and 5): the console shows the
project's own progress and summary, Ray's messages go to OUT/NAME/ray.log, every JSON
file is strict, and ``--resume`` applies ``--max-concurrent`` and says so. About 1-2 min."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tune.trainable import FAULT_ENV

REPO = Path(__file__).resolve().parents[1]


def _search(*args, env=None):
    return subprocess.run([sys.executable, "tune/search.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=500, env={**os.environ, **(env or {})})


def _strict(path: Path):
    def bad(token):
        raise ValueError(f"{path}: non-JSON token {token}")
    return json.loads(path.read_text(), parse_constant=bad)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("console")
    fault = tmp_path_factory.mktemp("fault")
    p = _search("--smoke-test", "--out", str(out), "--name", "c", "--num-samples", "3", "--max-epochs", "3",
                "--final-seeds", "1", env={FAULT_ENV: str(fault)})
    return {"proc": p, "out": out, "dir": out / "c"}


def test_console_has_no_ray_noise_and_ray_log_has_it(run):
    p = run["proc"]
    assert p.returncode == 0, p.stderr[-2000:]
    console = p.stdout + p.stderr
    assert "failed: DivergedError" in p.stdout  # the project's own line for the failed trial
    assert "## Cost ledger" in p.stdout
    for noise in ("Token authentication", "Trials did not complete", "WARNING", "ERROR", "Traceback",
                  "RuntimeWarning"):
        assert noise not in console, noise
    # what Ray prints depends on its state (the token warning, a failed trial's line): that it
    # lands in ray.log is pinned by test_ray_console_to_routes_ray_records_to_the_file
    assert (run["dir"] / "ray.log").is_file()


def test_ray_console_to_routes_ray_records_to_the_file(tmp_path, capsys):
    import logging

    from tune.runner import ray_console_to

    logger = logging.getLogger("ray.tune.console_test")
    handler = logging.StreamHandler(sys.stderr)  # like Ray's own console handlers
    logger.addHandler(handler)
    try:
        with ray_console_to(tmp_path / "ray.log") as route:
            logger.warning("Token authentication is enabled for this Ray cluster")
            later = logging.getLogger("ray.tune.console_test_late")  # a handler added by ray.init
            later.addHandler(logging.StreamHandler(sys.stderr))
            route()
            later.warning("Trials did not complete: [t1]")
        logger.warning("after the block")
    finally:
        logger.handlers.clear()
        logging.getLogger("ray.tune.console_test_late").handlers.clear()
    log = (tmp_path / "ray.log").read_text()
    assert "Token authentication" in log and "Trials did not complete" in log
    err = capsys.readouterr().err
    assert "Token authentication" not in err and "Trials did not complete" not in err
    assert "after the block" in err  # the console streams come back


def test_every_json_of_the_experiment_is_strict(run):
    d = run["dir"]
    files = [d / "best.json", d / "search.json"] + sorted((d / "final").glob("seed_*.json"))
    files += sorted(d.glob("trial_*/checkpoint_*/tune_state.json"))
    assert len(files) >= 3
    for f in files:
        _strict(f)
    best = _strict(d / "best.json")
    assert best["final"]["n_ok"] == 1


def test_resume_applies_max_concurrent_and_refuses_gpus(run):
    p = _search("--resume", "--out", str(run["out"]), "--name", "c", "--gpus-per-trial", "0")
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "search.py: error: --resume continues the recorded search: --gpus-per-trial cannot change on resume "
        "(allowed: --max-concurrent, --final-seeds, --address; --space/--out/--name locate it)"]
    p = _search("--resume", "--out", str(run["out"]), "--name", "c", "--max-concurrent", "1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resume: applying --max-concurrent 1 (was 2)" in p.stdout
    assert _strict(run["dir"] / "search.json")["space"]["max_concurrent"] == 1
    assert "Token authentication" not in p.stdout + p.stderr
