"""Sensitivity report of a finished MMSSL search: one self-contained plotly HTML file.

Run from the repository root::

    python analysis/sensitivity.py --study runs/search/NAME                  # part 1 only: seconds
    python analysis/sensitivity.py --study runs/search/NAME --sweep configs/sensitivity.yaml
    python analysis/sensitivity.py --study runs/search/NAME --sweep configs/sensitivity.yaml --resume
    python analysis/sensitivity.py --smoke-test                             # search smoke test + tiny sweep: minutes on a CPU

Part 1 (no training) reads the search folder: fANOVA and PED-ANOVA importance on the
COMPLETE trials (``optuna.importance``), the objective against every hyperparameter,
a boundary check (top trials crowding a bound of the range: a warning, also printed
here), contours of the most important pairs, parallel coordinates, the optimization
history and every trial's learning curve with ASHA's rungs.

Part 2 (``--sweep FILE``, training) changes one hyperparameter at a time around the
best configuration over a grid (default 5 values spanning its range, log-spaced for
log distributions, plus the best value) with several seeds (default 3): full budget,
no scheduler (fit's patience stays), validation selection, test evaluated once. The
runs are Ray tasks launched by ``tune.runner.run_fits`` (``--address``,
``--gpus-per-run``); finished runs are cached and never re-run (``--resume``). A
``--resume`` with a changed sweep file says what changed (``sweeps/sweep.json`` keeps
the last one); a run without ``--sweep`` into a folder that holds ``sweeps.csv`` says
that it is not in the new report.

Outputs in ``--out`` (default ``STUDY/sensitivity/``): ``report.html`` (plotly.js
embedded, opens offline), ``importance.csv``, ``boundary.csv``, ``sweeps.csv`` (one
row per hyperparameter, value and seed), ``sweeps/`` (cached runs, ``sweep.json``),
``figures/*.png`` (kaleido, when a
Chrome/Chromium is installed; otherwise a one-line notice). Bad input (a folder that
is not a finished search, a sweep key that was not searched, bad YAML) is one line on
stderr and exit status 2, before anything is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the repository's packages
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmssl.cli import check_out_dir, run_main  # noqa: E402
from mmssl.errors import ConfigError  # noqa: E402

SMOKE_SEEDS, SMOKE_PARAMS, SMOKE_EPOCHS = (1, 2), 2, 3  # and 3 values: both bounds and the best
SWEEP_FILE = "sweep.json"  # in OUT/sweeps: the grids, seeds and epochs last run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="analysis/sensitivity.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit status: 0 ok, 2 bad input (nothing written), 130 interrupted "
                                       "(finished sweep runs are kept; continue with --resume).")
    p.add_argument("--study", metavar="DIR", help="a finished search folder OUT/NAME of tune/search.py")
    p.add_argument("--sweep", metavar="FILE", help="sweep file (see configs/sensitivity.yaml): run part 2")
    p.add_argument("--out", metavar="DIR", help="output folder (default: STUDY/sensitivity)")
    p.add_argument("--seeds", type=int, metavar="N", help="sweep seeds 1..N (overrides the file's 'seeds')")
    p.add_argument("--epochs", type=int, metavar="E", help="epochs per sweep run (default: the search's full budget)")
    p.add_argument("--data", metavar="DIR", help="data for the sweeps when the search's recorded path no longer "
                   "resolves from here (same data; the subset is taken again with the search's seed)")
    p.add_argument("--cpus-per-run", type=float, metavar="C", help="CPUs per sweep run (torch threads)")
    p.add_argument("--gpus-per-run", type=float, metavar="G", help="GPUs per sweep run (fractions share a GPU)")
    p.add_argument("--max-concurrent", type=int, metavar="K", help="sweep runs at once (default: as Ray allows)")
    p.add_argument("--address", metavar="ADDR", help="run the sweeps on a running Ray cluster (as tune/search.py)")
    p.add_argument("--resume", action="store_true", help="reuse the finished runs of an earlier sweep in OUT")
    p.add_argument("--no-png", action="store_true", help="skip figures/*.png")
    p.add_argument("--smoke-test", action="store_true", help="without --study: run tune/search.py's smoke test "
                   "first (no final re-training); then a 2-parameter x 3-value x 2-seed sweep of 3 epochs "
                   "(a few minutes on 2 CPUs)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    for flag in ("seeds", "epochs", "max_concurrent"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be >= 1, got {v}")
    if (args.gpus_per_run is not None and args.gpus_per_run < 0) or \
            (args.cpus_per_run is not None and args.cpus_per_run <= 0):
        raise ConfigError("--cpus-per-run must be > 0 and --gpus-per-run >= 0")
    if not args.study and not args.smoke_test:
        raise ConfigError("--study DIR is required (or --smoke-test)")
    if args.out:
        check_out_dir(args.out, "--out")  # a file there: exit 2 now, not after the work
    if args.smoke_test and not args.study:  # one Ray for the search's smoke test and the sweep
        from tune.runner import ray_console_to, ray_session

        searches = Path(args.out) / "search" if args.out else Path("runs/search")  # nothing outside --out
        with ray_console_to(searches / "ray.log") as reroute, ray_session(address=args.address):
            reroute()
            args.study = _smoke_search(args.address, searches)
            return _report(args, t0)
    return _report(args, t0)


def _report(args, t0: float) -> int:
    """Everything after the arguments are checked: load, analyse, sweep, write."""
    from analysis.search_folder import load_search

    search = load_search(args.study)  # ConfigError: not a finished search
    out = Path(args.out) if args.out else search.path / "sensitivity"
    spec = _sweep_spec(args, search)  # validated before anything is written or started
    if spec is not None and _has_runs(out) and not args.resume:
        raise ConfigError(f"{out / 'sweeps'} already holds sweep runs; add --resume to reuse the finished ones "
                          "(they are never re-run), or give another --out")
    print(f"study: {search.path} ({search.data_name}, {len(search.trials)} trials, {search.metric})", flush=True)

    import optuna

    from analysis import report as rep
    from analysis.boundary import check_boundaries
    from analysis.importance import importances

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    imp = importances(search.study, list(search.space.params), seed=search.space.seed)
    boundary, warns = check_boundaries(search.trials, search.space.params)
    print(f"importance: {imp.n_complete} COMPLETE trials used; left out: "
          + (", ".join(f"{n} {s}" for s, n in sorted(imp.left_out.items())) or "none"), flush=True)
    for w in warns:
        print(f"warning: boundary: {w.message()}", file=sys.stderr, flush=True)
    sweeps = info = None
    if spec is not None:
        sweeps, info = _run_sweeps(args, search, spec, out)
    elif (out / "sweeps.csv").is_file():
        print(f"warning: {out / 'sweeps.csv'} is from an earlier --sweep run and is not in this report; "
              "add --sweep FILE --resume to include it (its finished runs are reused)", file=sys.stderr, flush=True)
    report = rep.build(search, imp, boundary, warns, sweeps, info)
    out.mkdir(parents=True, exist_ok=True)
    imp.table.to_csv(out / "importance.csv", index=False)
    boundary.to_csv(out / "boundary.csv", index=False)
    if sweeps is not None:
        sweeps.to_csv(out / "sweeps.csv", index=False)
    report.write(out / "report.html")
    if not args.no_png:
        from analysis.headless import write_pngs

        notice = write_pngs(report.figures, out / "figures")
        print(notice or f"figures: {len(report.figures)} PNGs in {out / 'figures'}", flush=True)
    print(f"report: {out / 'report.html'}  ({len(warns)} boundary warning(s), {time.time() - t0:.0f} s)", flush=True)
    return 0


def _sweep_spec(args, search):
    """The sweep to run (None: part 1 only); ConfigError for a bad file or flag."""
    from analysis.sweep import SweepSpec, load_sweep, with_overrides

    if args.sweep:
        spec = load_sweep(args.sweep, search.space, search.best)
    elif args.smoke_test:
        spec = SweepSpec("--smoke-test", {}, seeds=SMOKE_SEEDS, max_concurrent=2)
    else:
        return None
    if args.smoke_test:  # the file's first two hyperparameters (else see _smoke_grids), 3 values, 2 seeds
        spec = dataclasses.replace(spec, grids=_smoke_grids(search, list(spec.grids)), seeds=SMOKE_SEEDS,
                                   epochs=min(SMOKE_EPOCHS, search.space.max_epochs))
    if not search.best.get("config"):
        raise ConfigError(f"{search.path}: the search has no best configuration (every trial failed); nothing to sweep")
    return with_overrides(spec, seeds=tuple(range(1, args.seeds + 1)) if args.seeds else None, epochs=args.epochs,
                          cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
                          max_concurrent=args.max_concurrent)


def _smoke_grids(search, keys: list[str]) -> dict:
    """Smoke-test grids: ``keys[:2]`` (default: the first two searched), each at its two bounds and the best."""
    from analysis.sweep import grid

    keys = keys or list(search.space.params)
    return {k: grid(search.space.params[k], search.best_params().get(k), 2) for k in keys[:SMOKE_PARAMS]}


def _has_runs(out: Path) -> bool:
    runs = out / "sweeps" / "runs"
    return runs.is_dir() and any(runs.glob("*.json"))


def _run_sweeps(args, search, spec, out: Path):
    """Train every run of the sweep (cached in ``OUT/sweeps/runs``); returns (sweeps table, info)."""
    import warnings

    from analysis import sweep as sw
    from tune.search import load_data

    space = search.space if not args.data else dataclasses.replace(search.space, data=args.data)
    if not space.data.startswith("synthetic") and not Path(space.data).is_dir():
        raise ConfigError(f"the search's data folder {space.data} does not exist from here; pass --data DIR")
    label = Path(space.data).name if not space.data.startswith("synthetic") else space.data
    label += f"-sub{space.subset_users}" if space.subset_users else ""
    rows, jobs = sw.plan(spec, space, search.best, label)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data(space)  # DataError: one line, exit 2
    for w in caught:
        print(f"warning: {str(w.message).splitlines()[0]}", file=sys.stderr)
    epochs = spec.epochs or space.max_epochs
    print(f"sweeps: {', '.join(f'{k} ({len(v)} values)' for k, v in spec.grids.items())} x seeds {list(spec.seeds)}"
          f" = {len(rows)} rows, {len(jobs)} distinct runs of {epochs} epochs -> {out / 'sweeps'}", flush=True)
    _note_changed_sweep(out / "sweeps" / SWEEP_FILE, spec, epochs)
    from tune.runner import ray_console_to, ray_session, run_fits

    try:
        with ray_console_to(out / "ray.log") as reroute, ray_session(address=args.address):
            reroute()  # Ray's own console messages go to the log file
            results = run_fits(jobs, {label: data}, out / "sweeps" / "runs", cpus_per_run=spec.cpus_per_run,
                               gpus_per_run=spec.gpus_per_run, max_concurrent=spec.max_concurrent)
    except KeyboardInterrupt:
        print(f"interrupted: finished runs are kept in {out / 'sweeps' / 'runs'}; continue with the same command "
              "plus --resume", file=sys.stderr)
        raise
    table = sw.table(rows, results)
    info = {"seeds": spec.seeds, "epochs": epochs, "grids": spec.grids}
    return table, info


def _note_changed_sweep(path: Path, spec, epochs: int) -> None:
    """Keep the sweep's grids, seeds and epochs in ``path``; say which differ from the saved ones.

    A sweep continued with ``--resume`` from a changed file reuses the finished runs that
    still belong to it and runs the new ones; this names the change in one line on stderr
    (hyperparameters added, removed or with other values; seeds and epochs old -> new), so
    that it is not silent. An unreadable saved file is said and replaced. Raises nothing.
    """
    now = json.loads(json.dumps({"grids": {k: list(v) for k, v in spec.grids.items()}, "seeds": list(spec.seeds),
                                 "epochs": epochs}, default=float))
    before = None
    if path.exists():
        try:
            before = json.loads(path.read_text())
            if not (isinstance(before, dict) and isinstance(before.get("grids"), dict)):
                raise ValueError("not a sweep record")
        except (OSError, ValueError) as e:
            print(f"warning: {path} could not be read ({str(e).splitlines()[0]}); it is replaced by this sweep's",
                  file=sys.stderr, flush=True)
            before = None
    if before is not None and before != now:
        old_grids, new_grids = before["grids"], now["grids"]
        parts = [f"{k} added" for k in new_grids if k not in old_grids]
        parts += [f"{k} removed" for k in old_grids if k not in new_grids]
        parts += [f"{k} values {old_grids[k]} -> {new_grids[k]}" for k in new_grids
                  if k in old_grids and old_grids[k] != new_grids[k]]
        parts += [f"{k} {before.get(k)} -> {now[k]}" for k in ("seeds", "epochs") if before.get(k) != now[k]]
        print(f"warning: this sweep differs from the one run before in {path.parent}: " + "; ".join(parts)
              + ". Finished runs that still belong to it are reused, the others run now", file=sys.stderr, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(now, indent=1))


def _smoke_search(address: str | None, parent: Path) -> str:
    """Run ``tune/search.py --smoke-test`` (no final re-training) in ``parent``; its folder."""
    from tune import search as ts

    out, name = str(parent), time.strftime("smoke-sens-%Y%m%d-%H%M%S")
    print(f"smoke test: running tune/search.py --smoke-test -> {out}/{name}", flush=True)
    argv = ["--smoke-test", "--out", out, "--name", name, "--final-seeds", "0"]
    rc = ts.main(argv + (["--address", address] if address else []))
    if rc != 0:
        print(f"analysis/sensitivity.py: error: the search smoke test failed (exit {rc}); see {out}/{name}",
              file=sys.stderr)
        raise SystemExit(rc)
    return str(Path(out) / name)


if __name__ == "__main__":
    sys.exit(run_main(main))
