"""Hyperparameter search for MMSSL: Ray Tune + Optuna TPE + ASHA, then a seeded re-training.

Run from the repository root::

    python tune/search.py --smoke-test                                   # ~2 min on 2 CPUs
    python tune/search.py --space configs/space.yaml --data ../shared/data/tiktok \\
        --set adversarial=false --num-samples 16 --max-epochs 40         # CPU-sized TikTok
    python tune/search.py --space configs/space.yaml --gpus-per-trial 0.5 --max-concurrent 2
    python tune/search.py --resume --out runs/search --name mmssl-search  # continue after a crash/Ctrl-C

The space file (see ``tune/space.py``) names the data, the fixed settings, the searched
hyperparameters and the budget; flags override it. Everything is validated before Ray
starts: a bad file or flag is one line on stderr and exit status 2.

Each trial is ``mmssl.train.fit`` reporting every epoch to Tune; ASHA
(``time_attr="epoch"``) stops weak trials at its rungs; a prune-aware OptunaSearch
(seeded TPE, study in ``OUT/NAME/study.db``) tells Optuna PRUNED / COMPLETE / FAIL.
The best trial (by the validation metric) is then re-trained with ``final.seeds``
seeds at the full budget, each evaluated once on test. Outputs in ``OUT/NAME/``:
``trials.csv``/``.parquet``, ``curves.parquet``, ``best.json``, ``study.db``,
``summary.md``, ``search.json`` (the resolved settings) and Ray's experiment state.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the repo's packages, not tune/*.py as top-level modules
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmssl import jsonio  # noqa: E402
from mmssl.cli import check_out_dir, run_main  # noqa: E402
from mmssl.errors import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPACE = REPO / "configs" / "space.yaml"
# --smoke-test: the space's search section on small synthetic data with a tiny budget
SMOKE = dict(data="synthetic:300x200", num_samples=6, max_epochs=9, grace_period=1, reduction_factor=3,
             max_concurrent=2, cpus_per_trial=1, gpus_per_trial=0, checkpoint_every=2, final_seeds=2,
             n_startup_trials=3,
             sets=["embed_dim=32", "batch_size=128", "patience=3", "eval_chunk=512"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tune/search.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags override the space file. Exit status: 0 ok, 2 bad input (nothing started), 130 interrupted.")
    p.add_argument("--space", metavar="FILE", help=f"search-space YAML (default with --smoke-test: {DEFAULT_SPACE.relative_to(REPO)}; "
                   "with --resume: the copy saved in OUT/NAME/search.json)")
    p.add_argument("--data", metavar="DIR", help="'synthetic' or a data directory (either layout); overrides 'data'")
    p.add_argument("--subset-users", type=int, metavar="N", help="search on a random subset of N users (cheap CPU runs)")
    p.add_argument("--out", metavar="DIR", help="parent folder of the experiment (default: the file's 'out', runs/search)")
    p.add_argument("--name", help="experiment name; outputs go to OUT/NAME (default: the file's 'name')")
    p.add_argument("--num-samples", type=int, metavar="N", help="number of trials (budget.num_samples)")
    p.add_argument("--max-epochs", type=int, metavar="E", help="epochs of a full trial = ASHA's max_t (fixed.epochs)")
    p.add_argument("--cpus-per-trial", type=float, metavar="C", help="CPUs per trial; also torch's thread count")
    p.add_argument("--gpus-per-trial", type=float, metavar="G", help="GPUs per trial (fractions share a GPU); 0 = CPU")
    p.add_argument("--max-concurrent", type=int, metavar="K", help="trials running at once")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the TPE sampler (trials train with fixed.seed)")
    p.add_argument("--final-seeds", type=int, metavar="N", help="seeds for re-training the best config (final.seeds); 0 = skip")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config key (aliases ok), e.g. --set adversarial=false; a searched key is pinned. Repeatable")
    p.add_argument("--max-failures", type=int, metavar="N", help="retries of a trial whose worker process or node "
                   "died, each from its last checkpoint (budget.max_failures, default 2); a diverged trial is never retried")
    p.add_argument("--address", metavar="ADDR", help="join a running Ray cluster (the head's HOST:6379, auto, or "
                   "ray://host:10001; default $RAY_ADDRESS) instead of starting a private local one; "
                   "OUT must then be on storage all nodes share")
    p.add_argument("--resume", action="store_true", help="continue the experiment in OUT/NAME: finished trials kept, "
                   "unfinished ones resumed from their checkpoints, the Optuna study reloaded; failed trials stay failed "
                   "(see --retry-failed); a finished experiment only has its outputs rebuilt")
    p.add_argument("--retry-failed", action="store_true", help="with --resume: also re-run, from their last checkpoint, "
                   "trials that failed for a transient cause (worker/node lost, out of memory); diverged trials stay failed")
    p.add_argument("--smoke-test", action="store_true", help="small synthetic data (300 users x 200 items), 6 trials "
                   "of at most 9 epochs, ASHA grace 1 / factor 3, 2 final seeds: about 2 minutes on 2 CPUs")
    return p


RECORD_VERSION = 2  # search.json: 2 = exact params (Param.to_dict) and the data fingerprint
# On --resume: flags that can apply (the override key they set) and flags that cannot.
RESUME_APPLIES = {"max_concurrent": "--max-concurrent", "final_seeds": "--final-seeds"}
RESUME_REFUSES = {"data": "--data", "subset_users": "--subset-users", "num_samples": "--num-samples",
                  "max_epochs": "--max-epochs", "cpus_per_trial": "--cpus-per-trial",
                  "gpus_per_trial": "--gpus-per-trial", "seed": "--seed", "set": "--set", "smoke_test": "--smoke-test",
                  "max_failures": "--max-failures"}  # Tune restores its own FailureConfig


def resume_flags(args: argparse.Namespace) -> dict:
    """The flags given with ``--resume`` that apply, as overrides; ConfigError naming the others.

    Trials already ran with the recorded data, budget, resources, sampler seed and
    fixed settings, so those cannot change; the concurrency limit and the final
    re-training's seeds can (``--address``, ``--space``, ``--out``, ``--name`` only
    locate the cluster and the experiment).
    """
    given = lambda v: bool(v) if isinstance(v, (bool, list)) else v is not None  # noqa: E731 -- 0 is given
    refused = [flag for key, flag in RESUME_REFUSES.items() if given(getattr(args, key))]
    if refused:
        raise ConfigError(f"--resume continues the recorded search: {', '.join(refused)} cannot change on resume "
                          f"(allowed: {', '.join(RESUME_APPLIES.values())}, --address; --space/--out/--name locate it)")
    return {key: getattr(args, key) for key in RESUME_APPLIES if getattr(args, key) is not None}


def read_record(exp_dir: Path) -> dict:
    """``exp_dir/search.json`` (what the search was started with); ConfigError if absent."""
    saved = exp_dir / "search.json"
    if not saved.is_file():
        raise ConfigError(f"--resume: {saved} not found (give the --out/--name of an existing experiment)")
    try:
        return jsonio.loads(saved.read_text())
    except ValueError as e:
        raise ConfigError(f"--resume: {saved} is not valid JSON ({e})") from None


def resolve(args: argparse.Namespace):
    """The validated Space for this run (file + smoke settings + flags) and the experiment folder."""
    from tune.space import Space, load_space, space_changes

    if args.out:
        check_out_dir(args.out, "--out")  # before any data is loaded or Ray starts
    if args.resume:
        applied = resume_flags(args)
        defaults = load_space(args.space) if args.space else Space(path="", params={})
        exp_dir = Path(args.out or defaults.out) / (args.name or defaults.name)
        d = read_record(exp_dir)
        path = args.space or d["path"]
        if not Path(path).is_file():
            raise ConfigError(f"--resume: the space file {path} recorded in {exp_dir / 'search.json'} is gone; "
                              f"pass --space")
        if "max_concurrent" in applied and d.get("version", 1) < RECORD_VERSION:
            raise ConfigError(f"--resume: --max-concurrent cannot change for {exp_dir}: it was started before "
                              f"the limit could be changed on resume (its Ray state keeps the old limit)")
        overrides = {**d["overrides"], **applied}
        space = load_space(path).override(**overrides)
        if d.get("version", 1) >= RECORD_VERSION:  # older records wrote the params differently
            diff = space_changes(d["space"], jsonio.loads(jsonio.dumps(space.to_dict(), default=str)),
                                 ignore=tuple(applied))
            if diff:
                raise ConfigError(f"--resume: the search settings changed since the search started "
                                  f"({'; '.join(diff)}): {path} differs from the copy in "
                                  f"{exp_dir / 'search.json'}; restore it, or start a new search")
        for key, value in applied.items():
            was = d["space"].get(key) if "space" in d else None
            now = getattr(space, key)
            print(f"resume: applying {RESUME_APPLIES[key]} {_plain_list(now)} (was {_plain_list(was)})", flush=True)
        return space, overrides, exp_dir
    path = args.space or (str(DEFAULT_SPACE) if args.smoke_test else None)
    if not path:
        raise ConfigError("--space FILE is required (or --smoke-test, or --resume)")
    space: Space = load_space(path)
    overrides: dict = dict(SMOKE, name=time.strftime("smoke-%Y%m%d-%H%M%S")) if args.smoke_test else {}
    flags = {"data": args.data, "subset_users": args.subset_users, "out": args.out, "name": args.name,
             "num_samples": args.num_samples, "max_epochs": args.max_epochs, "cpus_per_trial": args.cpus_per_trial,
             "gpus_per_trial": args.gpus_per_trial, "max_concurrent": args.max_concurrent, "seed": args.seed,
             "final_seeds": args.final_seeds, "max_failures": args.max_failures}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    overrides["sets"] = list(overrides.get("sets", [])) + list(args.set)
    space = space.override(**overrides)
    check_out_dir(space.out, "--out" if args.out else "out")
    return space, overrides, Path(space.out) / space.name


def _plain_list(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def load_data(space):
    """The data set of this search (loaded once, by the driver)."""
    from mmssl.data import load
    from mmssl.synthetic import generated_size, make_dataset

    size = generated_size(space.data)
    if size is not None:  # tune.space checked the form
        data = make_dataset(n_users=size[0], n_items=size[1], seed=space.seed)
    else:
        data = load(space.data)
    if space.subset_users:
        data = data.subset_users(space.subset_users, seed=space.seed)
    return data


def main(argv: list[str] | None = None, callbacks=()) -> int:
    """The CLI; ``callbacks``: extra Tune callbacks for a fresh search (tests use them to inject faults)."""
    args = build_parser().parse_args(argv)
    if args.retry_failed and not args.resume:
        raise ConfigError("--retry-failed only applies with --resume")
    space, overrides, exp_dir = resolve(args)
    if not args.resume and exp_dir.exists() and any(exp_dir.iterdir()):
        raise ConfigError(f"{exp_dir} already exists and is not empty; use --resume, or another --name/--out "
                          "(nothing is overwritten)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data(space)  # DataError -> one line, exit 2, before Ray starts
    for w in caught:
        print(f"warning: {str(w.message).splitlines()[0]}", file=sys.stderr)
    data.select_modalities(space.base_config().get("modalities"))  # e.g. no features: exit 2 now, not per trial
    from mmssl.fingerprint import check_same_data, fingerprint
    data_fp = fingerprint(data)
    if args.resume:  # the trials and the final seeds must continue on the data they started on
        check_same_data(read_record(exp_dir).get("data_fingerprint"), data_fp, f"--resume {exp_dir}")
    print(f"data: {data.summary()}", flush=True)
    exp_dir = exp_dir.resolve()
    t0 = time.time()

    import optuna  # heavy imports only once the input is known to be good
    from tune import results as res
    from tune.searcher import PruneAwareOptunaSearch, ResumableLimiter, close_unfinished
    from tune.runner import (STUDY_FILE, STUDY_NAME, Progress, check_resources, make_tuner, ray_console_to,
                             ray_session, restore_tuner, run_final)
    from tune.state import experiment_status, mark_failed_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    record = {"version": RECORD_VERSION, "path": os.path.abspath(space.path), "overrides": overrides, "space": space.to_dict(),
              "data_fingerprint": data_fp}
    with ray_console_to(exp_dir / "ray.log") as reroute, ray_session(address=args.address):
        reroute()  # ray.init may have added console handlers
        check_resources(space.cpus_per_trial, space.gpus_per_trial)  # before any trial: Ray would wait forever
        if args.resume:
            mark_failed_trials(exp_dir, exp_dir / STUDY_FILE, STUDY_NAME)  # before counting: Ray may have saved a failed trial as RUNNING
            status = experiment_status(exp_dir)
            ended = status.get("TERMINATED", 0) + status.get("ERROR", 0) * (not args.retry_failed)
            if ended >= space.num_samples:
                print(f"resume: {exp_dir} is finished ({ended}/{space.num_samples} trials ended); "
                      "rebuilding its outputs", flush=True)
            else:
                print(f"resume: {ended}/{space.num_samples} trials already ended in {exp_dir}", flush=True)
            ResumableLimiter.max_concurrent_on_restore = space.max_concurrent if "max_concurrent" in overrides else None
            tuner = restore_tuner(space, data, exp_dir, retry_failed=args.retry_failed)
        else:
            tuner, _ = make_tuner(space, data, exp_dir, callbacks=[Progress(space), *callbacks])
        (exp_dir / "search.json").write_text(jsonio.dumps(record, indent=1, default=str))
        print(f"search: {space.num_samples} trials x <= {space.max_epochs} epochs, "
              f"ASHA grace {space.grace_period} / factor {space.reduction_factor:g}, -> {exp_dir}", flush=True)
        sigint = signal.getsignal(signal.SIGINT)
        try:
            grid = tuner.fit()
        finally:
            PruneAwareOptunaSearch.study_path_on_restore = None
            ResumableLimiter.max_concurrent_on_restore = None
            PruneAwareOptunaSearch.tune_trials_on_restore = None
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, sigint)  # Tune leaves its handler, which would swallow Ctrl-C later
        wall_search = time.time() - t0
        finished = res.count_finished(grid)
        if finished < space.num_samples:  # Ctrl-C / SIGTERM: Ray saved the state and returned
            print(f"{Path(sys.argv[0]).name}: interrupted with {finished}/{space.num_samples} trials finished; "
                  f"continue with: python tune/search.py --resume --out {exp_dir.parent} --name {exp_dir.name}",
                  file=sys.stderr)
            return 130
        study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{exp_dir / STUDY_FILE}")
        trials, curves = res.collect(grid, space, study)
        ends = zip(trials["status"], trials["reason"], trials["objective"], trials["epochs"])
        if close_unfinished(study, dict(zip(trials["trial_id"], ends))):
            trials, curves = res.collect(grid, space, study)  # optuna_state of the trials just closed
        top = res.pick_best(trials)
        best: dict = {"metric": space.metric, "data": space.data, "subset_users": space.subset_users,
                      "experiment": str(exp_dir)}
        finals: list = []
        t1 = time.time()
        if top is not None:
            params = {k: _plain(top[k]) for k in space.params}
            config = {**space.base_config(), **params}
            val = {k: float(top[k]) for k in trials.columns if k.startswith("val/")}
            best.update(trial_id=top["trial_id"], status=top["status"], best_epoch=int(top["best_epoch"]),
                        params=params, config=config, val=val)
            if space.final_seeds:
                print(f"final: re-training trial {top['trial_id']} with seeds {list(space.final_seeds)}", flush=True)
                try:
                    finals = run_final(space, config, data, exp_dir / "final", data_fp=data_fp)
                except KeyboardInterrupt:
                    print(f"{Path(sys.argv[0]).name}: interrupted during the final re-training (finished seeds "
                          f"are kept in {exp_dir / 'final'}); continue with: python tune/search.py --resume "
                          f"--out {exp_dir.parent} --name {exp_dir.name}", file=sys.stderr)
                    return 130
            best["final"] = res.final_table(finals)
        ledger = res.cost_ledger(trials, space, wall_search, time.time() - t1, finals)
        md = res.write_outputs(exp_dir, space, trials, curves, best, ledger)
    print("\n" + md, flush=True)
    if top is None:
        print(f"{Path(sys.argv[0]).name}: error: every trial failed (see {exp_dir / 'trials.csv'}, "
              "column 'reason')", file=sys.stderr)
        return 1
    return 0


def _plain(v):
    """numpy scalars -> Python (for Config and JSON)."""
    return v.item() if hasattr(v, "item") else v


if __name__ == "__main__":
    sys.exit(run_main(main))
