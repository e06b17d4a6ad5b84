"""Ablation of MMSSL: variants x seeds x data sets, each variant tested against ``full``.

Run from the repository root::

    python analysis/ablation.py --smoke-test                           # ~1-2 min on 2 CPUs
    python analysis/ablation.py --config configs/ablation.yaml         # the default variants
    python analysis/ablation.py --config configs/ablation.yaml --seeds 3 --epochs 20 --gpus-per-run 0.5
    python analysis/ablation.py --resume --out runs/ablation --name ablation   # after Ctrl-C / a crash

Every (data set, variant, seed) is one ``mmssl.train.fit`` (validation selection, test
evaluated once at the best epoch) launched as a Ray task by ``tune.runner.run_fits``; a
diverged or crashed run is recorded with its reason and the others go on. Finished runs are
cached in ``OUT/NAME/runs/``: re-running the same command, or ``--resume``, skips them. An
existing ``OUT/NAME`` that holds an ablation with a different configuration is refused.

Statistics (``analysis/stats.py``): per data set, each variant against ``full``, a paired
t-test over seeds and a Wilcoxon signed-rank test + bootstrap CI over test users, Holm
across the variants; significant only when both corrected p < 0.05.

Outputs in ``OUT/NAME/``: ``runs.csv``, ``per_user.parquet``, ``ablation.json``,
``ablation.md``, ``ablation.tex`` (booktabs), ``ablation.html`` (self-contained plotly),
``spec.json`` (the resolved configuration). The file format: ``analysis/ablation_config.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

if __name__ == "__main__":  # run as a script: import the repo's packages
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.ablation_config import REFERENCE, AblationSpec, DataSpec, load_spec, read_yaml, spec_fingerprint, \
    spec_from_dict, variants_for  # noqa: E402
from mmssl.cli import check_out_dir, run_main  # noqa: E402
from mmssl.errors import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "ablation.yaml"
SPEC_FILE = "spec.json"
# --smoke-test: 3 variants x 2 seeds on small synthetic data, a few epochs
SMOKE = {
    "datasets": ["synthetic:240x160"],
    "base": {"set": {"embed_dim": 32, "batch_size": 256, "eval_chunk": 512, "topk_rate": 0.02},
             "epochs": 3, "patience": 2},
    "variants": {"full": {}, "w/o CL": {"contrastive": False}, "ID-only": {"modalities": []}},
    "seeds": 2, "resources": {"cpus_per_run": 1, "max_concurrent": 2},
    "stats": {"n_resamples": 999},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="analysis/ablation.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags override the file. Exit status: 0 ok (failed runs are reported, not fatal), 2 bad input "
               "(nothing started), 130 interrupted (continue with --resume).")
    p.add_argument("--config", metavar="FILE", help="ablation YAML (see configs/ablation.yaml); default with "
                   "--smoke-test: the built-in smoke settings; with --resume: the spec saved in OUT/NAME")
    p.add_argument("--out", metavar="DIR", help="parent folder of the ablation (default: the file's 'out', runs/ablation)")
    p.add_argument("--name", help="ablation name; outputs go to OUT/NAME (default: the file's 'name')")
    p.add_argument("--seeds", metavar="N|S1,S2,..", help="number of seeds (1..N) or an explicit comma list")
    p.add_argument("--epochs", type=int, metavar="E", help="maximum epochs of every run (base.epochs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the base config for every variant (repeatable), e.g. --set lr=1e-3")
    p.add_argument("--address", metavar="ADDR", help="connect to a running Ray cluster (e.g. auto) instead of "
                   "starting a private local one; OUT must then be on storage all nodes share")
    p.add_argument("--gpus-per-run", type=float, metavar="G", help="GPUs per run (fractions share a GPU); 0 = CPU")
    p.add_argument("--max-concurrent", type=int, metavar="K", help="runs at once (default: as resources allow)")
    p.add_argument("--resume", action="store_true", help="continue the ablation in OUT/NAME with its saved spec: "
                   "finished runs are kept, the rest run")
    p.add_argument("--smoke-test", action="store_true", help="synthetic 240x160 data, 3 variants (full, w/o CL, "
                   "ID-only), 2 seeds, 3 epochs: about 1-2 minutes on 2 CPUs")
    return p


def resolve(args: argparse.Namespace) -> tuple[AblationSpec, Path]:
    """The validated spec (file + smoke settings + flags) and the ablation folder."""
    spec, exp = _resolve(args)
    check_out_dir(exp, "--out/--name" if (args.out or args.name) else "out/name")  # a file there: exit 2 now
    return spec, exp


def _resolve(args: argparse.Namespace) -> tuple[AblationSpec, Path]:
    flags = {"out": args.out, "name": args.name, "seeds": args.seeds, "epochs": args.epochs,
             "gpus_per_run": args.gpus_per_run, "max_concurrent": args.max_concurrent, "sets": list(args.set)}
    if args.resume:
        changed = [f for f, v in (("--seeds", args.seeds), ("--epochs", args.epochs), ("--set", args.set)) if v]
        if changed:
            raise ConfigError(f"--resume continues the saved ablation as it was; {changed[0]} would change it "
                              "(start a new --name instead)")
        probe = load_spec(args.config, {"out": args.out, "name": args.name}) if args.config else None
        exp = Path(args.out or (probe.out if probe else "runs/ablation")) / (args.name or (probe.name if probe else "ablation"))
        saved = exp / SPEC_FILE
        if not saved.is_file():
            raise ConfigError(f"--resume: {saved} not found (give the --out/--name of an existing ablation)")
        d = json.loads(saved.read_text())["spec"]
        if probe is not None:  # --config with --resume: it must describe the saved ablation
            given = {k: v for k, v in json.loads(json.dumps(probe.to_dict(), default=str)).items()
                     if k in ("datasets", "base", "variants", "seeds", "stats_seed", "n_resamples", "sets")}
            differ = [k for k, v in given.items() if d.get(k) != v]
            if differ:
                raise ConfigError(f"--resume continues the saved ablation as it was; {args.config} differs from it "
                                  f"in {', '.join(differ)} (start a new --name instead)")
        d["datasets"] = [DataSpec(**x) for x in d["datasets"]]
        spec = AblationSpec(**d)
        spec.gpus_per_run = args.gpus_per_run if args.gpus_per_run is not None else spec.gpus_per_run
        spec.max_concurrent = args.max_concurrent or spec.max_concurrent
        return spec, exp
    if args.smoke_test and not args.config:
        flags["name"] = flags["name"] or time.strftime("smoke-%Y%m%d-%H%M%S")
        spec = spec_from_dict(SMOKE, "--smoke-test", {k: v for k, v in flags.items() if v is not None})
    elif args.config:
        spec = load_spec(args.config, flags)
        if not read_yaml(args.config):
            print(f"warning: {args.config} is empty: every default is used ({', '.join(d.name for d in spec.datasets)}, "
                  f"the default variants, {len(spec.seeds)} seeds)", file=sys.stderr)
    else:
        raise ConfigError("--config FILE is required (or --smoke-test, or --resume)")
    if len(spec.seeds) == 1:
        print("warning: 1 seed: the seed-level paired t-test needs at least 2 and is left out, and the per-user "
              "test does not see seed-to-seed variation; use 3 or more seeds for a table to publish", file=sys.stderr)
    return spec, Path(spec.out) / spec.name


def load_data(ds: DataSpec):
    """The data set (loaded once, by the driver), through the search's loader."""
    from tune.search import load_data as search_load

    return search_load(SimpleNamespace(data=ds.data, subset_users=ds.subset_users, seed=0))


def plan(spec: AblationSpec):
    """Load every data set and resolve the variants; all before Ray starts.

    Returns (datasets {name: Dataset}, resolved {name: {variant: config}}, jobs, aliases)
    where ``aliases`` maps a job key whose config equals an earlier job's (same data set)
    to that job's key: it is not run twice.
    """
    from tune.runner import FitJob, config_hash, job_key

    datas, resolved = {}, {}
    for ds in spec.datasets:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            datas[ds.name] = load_data(ds)
        for w in caught:
            print(f"warning: {str(w.message).splitlines()[0]}", file=sys.stderr)
        print(f"data {ds.name}: {datas[ds.name].summary()}", flush=True)
        resolved[ds.name] = variants_for(spec, datas[ds.name].modalities)
    jobs, aliases, first = [], {}, {}
    for ds in spec.datasets:
        for variant, cfg in resolved[ds.name].items():
            for seed in spec.seeds:
                c = {**cfg, "seed": int(seed)}
                key = job_key(ds.name, variant, seed, c)
                same = first.setdefault((ds.name, config_hash(c)), key)
                if same != key:
                    aliases[key] = same
                jobs.append((ds.name, variant, int(seed), FitJob(key, ds.name, c, True)))
    for ds in spec.datasets:
        full = resolved[ds.name][REFERENCE]
        for variant, cfg in resolved[ds.name].items():
            if variant != REFERENCE and cfg == full:
                print(f"warning: {ds.name}: variant '{variant}' resolves to the same config as '{REFERENCE}' "
                      "(its runs are full's; it will be flagged identical)", file=sys.stderr)
    return datas, resolved, jobs, aliases


def check_folder(exp: Path, fingerprint: dict) -> bool:
    """True when ``exp`` already holds this ablation; ConfigError when it holds anything else."""
    saved = exp / SPEC_FILE
    if saved.is_file():
        old = json.loads(saved.read_text()).get("fingerprint")
        if old != fingerprint:
            what = _first_difference(old, fingerprint)
            raise ConfigError(f"{exp} holds an ablation with a different config ({what}); nothing was changed: "
                              "use another --name/--out, or --resume to continue that one")
        return True
    # a folder holding only a run cache (runs/, e.g. copied from another ablation) is fine: each cached
    # run is reused only when its config hash and data fingerprint match
    if exp.exists() and any(p.name != "runs" for p in exp.iterdir()):
        raise ConfigError(f"{exp} exists and is not an ablation folder (no {SPEC_FILE}); use another --name/--out")
    return False


def _first_difference(a, b, path="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{path}{k}: only in the {'new' if k in b else 'saved'} one"
            if a[k] != b[k]:
                return _first_difference(a[k], b[k], f"{path}{k}.")
    return f"{path.rstrip('.')}: {a!r} saved, {b!r} now" if path else "different"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec, exp = resolve(args)
    datas, resolved, jobs, aliases = plan(spec)  # DataError / ConfigError -> exit 2, before Ray
    from tune.runner import data_fingerprint

    fingerprint = spec_fingerprint(spec, resolved, {n: data_fingerprint(d) for n, d in datas.items()})
    existing = check_folder(exp, fingerprint)
    exp.mkdir(parents=True, exist_ok=True)
    if not existing:
        (exp / SPEC_FILE).write_text(json.dumps({"spec": spec.to_dict(), "fingerprint": fingerprint,
                                                 "command": _command(argv)}, indent=1))
    exp = exp.resolve()

    from analysis import ablation_report as report
    from tune.runner import ray_console_to, ray_session, run_fits

    unique = [j for *_, j in jobs if j.key not in aliases]
    n_var = {ds.name: len(resolved[ds.name]) for ds in spec.datasets}
    print(f"ablation: {', '.join(f'{n} ({k} variants)' for n, k in n_var.items())} x {len(spec.seeds)} seeds = "
          f"{len(jobs)} runs ({len(unique)} distinct), <= {max(j.config['epochs'] for j in unique)} epochs each -> {exp}",
          flush=True)
    t0 = time.time()
    try:
        with ray_console_to(exp / "ray.log") as reroute, ray_session(address=args.address):
            reroute()  # Ray's own console messages go to the log file
            results = run_fits(unique, datas, exp / "runs", cpus_per_run=spec.cpus_per_run,
                               gpus_per_run=spec.gpus_per_run, max_concurrent=spec.max_concurrent)
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted; finished runs are kept in {exp / 'runs'}; continue with: "
              f"python analysis/ablation.py --resume --out {exp.parent} --name {exp.name}", file=sys.stderr)
        return 130
    by_key = {r["key"]: r for r in results}
    rows = [(ds, var, seed, by_key[aliases.get(job.key, job.key)]) for ds, var, seed, job in jobs]
    wall = time.time() - t0
    md = report.write_all(exp, spec, rows, command=_report_command(exp, argv), wall_s=wall)
    print("\n" + md, flush=True)
    failed = sum(r["status"] != "ok" for *_, r in rows)
    if failed:
        print(f"warning: {failed} of {len(rows)} runs failed; they are left out of the statistics "
              f"(see {exp / 'runs.csv'}, column 'reason')", file=sys.stderr)
    return 0


def _command(argv: list[str] | None) -> str:
    """The command line, shell-quoted (``shlex.join``): it can be pasted back into a shell."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "analysis/ablation.py", *args])


def _report_command(exp: Path, argv: list[str] | None) -> str:
    """The command that defined the ablation (saved in spec.json), and the last one run on it if other."""
    try:
        first = json.loads((exp / SPEC_FILE).read_text()).get("command")
    except (OSError, ValueError):
        first = None
    now = _command(argv)
    return now if not first or first == now else f"{first}  # last run with: {now}"


if __name__ == "__main__":
    sys.exit(run_main(main))
