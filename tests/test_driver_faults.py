"""A search driver interrupted (SIGINT), stopped (SIGTERM) or killed (SIGKILL), then ``--resume``: nothing lost.

The real ``tune/search.py`` runs in a subprocess on tiny synthetic data (4 trials of
4 epochs, 2 at a time, checkpoints every 2 epochs, 1 final seed). When the third trial
starts (the first has ended), the driver gets the signal. After ``--resume``:

* ``trials.csv`` has exactly ``num_samples`` trials, no trial id twice;
* the Optuna study has one trial per Tune trial, none RUNNING, states matching the table;
* the final seed ran once (its line printed once over both runs);
* the progress line after the resume counts the trials that had already ended;
* no Ray process of the killed driver survives, and its temp root is removed by the
  next run (SIGKILL) or by itself (SIGINT; SIGTERM, which acts as Ctrl-C: a batch
  scheduler's stop must not cost more than Ctrl-C does).

Then: the same ``--out/--name`` without ``--resume`` is refused (exit 2, one line; nothing
overwritten). About 1.5-2 min per signal on 2 busy cores.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from spaces import tiny_space
from tune.tempdirs import DRIVER_PID_FILE, TEMP_PREFIX, TEMP_ROOT

REPO = Path(__file__).resolve().parents[1]
NUM_SAMPLES, EPOCHS = 4, 4
SPACE = tiny_space(epochs=EPOCHS, num_samples=NUM_SAMPLES, final_seeds="[1]")
STATES = {"completed": "COMPLETE", "stopped_early": "PRUNED", "failed": "FAIL"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    return env


def _descendants(pid: int) -> set[int]:
    """PIDs below ``pid`` in the process tree (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22): with a
    small pid_max a PID is soon reused, so a PID alone does not name a process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _running(pid: int, started: str | None = None) -> bool:
    """``pid`` is alive (not a zombie) and, when ``started`` is given, still the same process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z" and (started is None or fields[19] == started)


def _temp_roots_of(pid: int) -> list[Path]:
    return [d for d in Path(TEMP_ROOT).glob(TEMP_PREFIX + "*") if _driver_pid(d) == pid]


def _driver_pid(root: Path) -> int | None:
    try:
        return int((root / DRIVER_PID_FILE).read_text())
    except (OSError, ValueError):
        return None


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _interrupt(cmd: list[str], log: Path, sig: int, timeout: float = 240) -> dict:
    """Run ``cmd`` until its third trial starts, then send ``sig``; wait for the end of its processes.

    For SIGTERM the driver starts with SIGINT ignored, as a job started with ``cmd &`` in a
    script does: SIGTERM must stop it all the same."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=fh, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=_ignore_sigint if sig == signal.SIGTERM else None)
    t0 = time.time()
    while time.time() - t0 < timeout:
        text = log.read_text()
        if len(re.findall(r"\] start  ", text)) >= 3 and "] end  " in text:
            break
        if proc.poll() is not None:
            pytest.fail(f"the search ended before the signal:\n{text[-3000:]}")
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"no third trial within {timeout} s:\n{log.read_text()[-3000:]}")
    tree = {p: _start_time(p) for p in _descendants(proc.pid)}
    roots = _temp_roots_of(proc.pid)
    os.kill(proc.pid, sig)
    rc = proc.wait(timeout=120)
    deadline = time.time() + 90          # Ray's processes notice a dead driver within seconds; slower on busy cores
    while time.time() < deadline and any(_running(p, t) for p, t in tree.items()):
        time.sleep(0.5)
    return {"rc": rc, "pid": proc.pid, "tree": tree, "roots": roots, "log": log.read_text()}


GRACEFUL = ("SIGINT", "SIGTERM")


@pytest.fixture(scope="module", params=["SIGINT", "SIGTERM", "SIGKILL"])
def interrupted(request, tmp_path_factory):
    sig = getattr(signal, request.param)
    out = tmp_path_factory.mktemp(request.param.lower())
    space = out / "space.yaml"
    space.write_text(SPACE)
    t0 = time.time()
    roots_before = set(Path(TEMP_ROOT).glob(TEMP_PREFIX + "*"))
    first = _interrupt([sys.executable, "tune/search.py", "--space", str(space), "--out", str(out), "--name", "x"],
                       out / "first.log", sig)
    t1 = time.time()
    proc = subprocess.Popen([sys.executable, "tune/search.py", "--resume", "--out", str(out), "--name", "x"],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=400)
    resumed = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return {"signal": request.param, "first": first, "resumed": resumed, "resumed_pid": proc.pid,
            "dir": out / "x", "out": out, "roots_before": roots_before,
            "seconds": (t1 - t0, time.time() - t1)}


def test_the_driver_ended_and_left_no_ray_process(interrupted):
    first = interrupted["first"]
    if interrupted["signal"] in GRACEFUL:
        assert first["rc"] == 130, first["log"][-3000:]
        assert "continue with: python tune/search.py --resume" in first["log"]
        assert not first["roots"] or not any(r.exists() for r in first["roots"])  # removed on the way out
    else:
        assert first["rc"] == -signal.SIGKILL
    assert first["tree"], "the driver had started Ray processes"
    assert not [p for p, t in first["tree"].items() if _running(p, t)], "Ray processes of the dead driver survive"


def test_resume_finishes_with_exactly_num_samples_trials(interrupted):
    resumed, d = interrupted["resumed"], interrupted["dir"]
    assert resumed.returncode == 0, resumed.stderr[-3000:] + resumed.stdout[-3000:]
    trials = pd.read_csv(d / "trials.csv")
    assert len(trials) == NUM_SAMPLES
    assert trials["trial_id"].is_unique
    assert trials["status"].isin(["completed", "stopped_early"]).all(), trials[["trial_id", "status", "reason"]]
    study = optuna.load_study(study_name="mmssl", storage=f"sqlite:///{d / 'study.db'}")
    assert len(study.trials) == NUM_SAMPLES
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    by_ray = {t.user_attrs.get("ray_trial_id"): t for t in study.trials}
    assert sorted(by_ray) == sorted(trials["trial_id"])
    for _, row in trials.iterrows():
        assert by_ray[row["trial_id"]].state.name == STATES[row["status"]] == row["optuna_state"]
        assert by_ray[row["trial_id"]].number == row["optuna_number"]
    finals = interrupted["first"]["log"].count("final seed 1:") + resumed.stdout.count("final seed 1:")
    assert finals == 1 and (d / "final" / "seed_1.json").is_file()
    print(f"\n{interrupted['signal']}: trials requested {NUM_SAMPLES}, finished {len(trials)}, "
          f"duplicated {len(trials) - trials['trial_id'].nunique()}, study {len(study.trials)} "
          f"({dict(pd.Series([t.state.name for t in study.trials]).value_counts())}); "
          f"first run {interrupted['seconds'][0]:.0f} s, resume {interrupted['seconds'][1]:.0f} s")


def test_progress_after_resume_counts_trials_already_ended(interrupted):
    out = interrupted["resumed"].stdout
    ended = int(re.search(r"resume: (\d+)/%d trials already ended" % NUM_SAMPLES, out).group(1))
    if interrupted["signal"] in GRACEFUL:  # Tune saves its state on the way out (SIGKILL: its last snapshot)
        assert ended >= 1
    counts = [int(n) for n in re.findall(r"\[(\d+)/%d done" % NUM_SAMPLES, out)]
    assert counts and counts[0] == ended + 1 and counts[-1] == NUM_SAMPLES, out[-3000:]


def test_the_next_run_cleans_the_killed_drivers_temp_root(interrupted):
    roots = interrupted["first"]["roots"]
    assert len(roots) == 1
    assert not roots[0].exists()
    # the resumed run removed its own root on exit: no root this test's runs made is left
    # (roots of other people's runs on a shared machine, made meanwhile, are not this test's business)
    made = set(Path(TEMP_ROOT).glob(TEMP_PREFIX + "*")) - interrupted["roots_before"]
    ours = {interrupted["first"]["pid"], interrupted["resumed_pid"]}
    assert not [d for d in made if _driver_pid(d) in ours]


def test_existing_experiment_is_refused_and_nothing_is_overwritten(interrupted):
    if interrupted["signal"] != "SIGINT":
        pytest.skip("checked once")
    d, out = interrupted["dir"], interrupted["out"]
    before = {p.name: p.stat().st_mtime for p in d.iterdir()}
    again = subprocess.run([sys.executable, "tune/search.py", "--space", str(out / "space.yaml"), "--out", str(out),
                            "--name", "x"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert "already exists" in again.stderr and "--resume" in again.stderr
    assert {p.name: p.stat().st_mtime for p in d.iterdir()} == before


def test_clean_stale_temp_roots_removes_only_roots_of_dead_drivers(tmp_path):
    from tune.tempdirs import clean_stale_temp_roots
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    roots = {name: tmp_path / (TEMP_PREFIX + name) for name in ("dead", "alive", "foreign")}
    for d in roots.values():
        (d / "session_latest").mkdir(parents=True)
    (roots["dead"] / DRIVER_PID_FILE).write_text(str(dead.pid))
    (roots["alive"] / DRIVER_PID_FILE).write_text(str(os.getpid()))
    assert clean_stale_temp_roots(str(tmp_path)) == [str(roots["dead"])]
    assert not roots["dead"].exists() and roots["alive"].exists() and roots["foreign"].exists()
