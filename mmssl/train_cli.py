"""The ``python -m mmssl.train`` command line: argument parsing, run folder, progress lines.

Writes into OUT: ``config.yaml`` (resolved), ``run.json`` (data source, command),
``metrics.jsonl`` (one JSON object per epoch), ``checkpoint.pt`` (every epoch,
exact resume state) and ``result.json`` (best epoch, its val metrics, test metrics,
seconds, config). Exit status 2 on bad input, 3 on divergence.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from mmssl import jsonio
from mmssl.cli import check_out_dir, run_main
from mmssl.config import Config, read_yaml_mapping
from mmssl.errors import ConfigError

METRIC_WHY = ("a metric is null where its value was not a finite number (NaN: no user of the split "
              "could be scored; inf: overflow); 'nonfinite' maps each null to what it was")
SMOKE = {"epochs": 3, "batch_size": 128, "embed_dim": 32, "patience": 0}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


USAGE = """Train and evaluate one MMSSL model (WWW 2023): model selection on val/recall@20 with
early stopping (patience), test evaluated once at the selected epoch.

Writes into OUT: config.yaml (resolved), run.json, metrics.jsonl (one line per epoch),
checkpoint.pt (exact resume state) and result.json (best epoch, val and test metrics).
Exit status: 0 done, 2 bad input (one line, nothing written), 3 training diverged."""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m mmssl.train", description=USAGE,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Config keys and paper symbols: see README.md (e.g. --set lambda2=0.1 == --set cl_weight=0.1).")
    p.add_argument("--data", default=None,
                   help="data directory (MMSSL json or MMRec .inter layout), 'synthetic' (default, the embedded "
                        "set) or 'synthetic:UxI' (a generated one of U users and I items)")
    p.add_argument("--out", help="run folder to create (required unless --resume)")
    p.add_argument("--config", help="YAML config file (default: built-in defaults = configs/mmssl.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable); paper aliases accepted")
    p.add_argument("--epochs", type=int, help="maximum epochs (config key 'epochs')")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (config key 'device')")
    p.add_argument("--seed", type=int, help="random seed (config key 'seed')")
    p.add_argument("--subset-users", type=int, metavar="N", help="train on a random subset of N users (cheap CPU runs)")
    p.add_argument("--resume", metavar="OUT", help="continue the interrupted run in OUT exactly")
    p.add_argument("--smoke-test", action="store_true",
                   help="small synthetic data and a 3-epoch budget: finishes in seconds on a CPU")
    p.add_argument("--quiet", action="store_true", help="no progress bar (summary lines only)")
    return p


def _resolve(args) -> tuple[Config, str, Path, bool]:
    if args.resume:
        ignored = [flag for flag, v in (("--data", args.data), ("--out", args.out), ("--config", args.config),
                                        ("--set", args.set), ("--subset-users", args.subset_users),
                                        ("--smoke-test", args.smoke_test), ("--seed", args.seed)) if v]
        if ignored:
            raise ConfigError(f"--resume continues the run with its recorded data and config; "
                              f"{', '.join(ignored)} cannot apply (allowed with --resume: --epochs, --device, --quiet)")
        out = check_out_dir(args.resume, "--resume")
        if not (out / "checkpoint.pt").is_file() or not (out / "run.json").is_file():
            raise ConfigError(f"{out}: not a resumable run folder (needs checkpoint.pt and run.json)")
        run = json.loads((out / "run.json").read_text())
        cfg = Config.from_dict(read_yaml_mapping(out / "config.yaml"), where=str(out / "config.yaml"))
        data = run["data"]
        args.subset_users = run.get("subset_users")
    else:
        if not args.out:
            raise ConfigError("--out is required (or --resume OUT)")
        out = check_out_dir(args.out, "--out")  # before any data is loaded
        if (out / "metrics.jsonl").exists() or (out / "checkpoint.pt").exists():
            raise ConfigError(f"{out}: already holds a run; use --resume {out} or another --out")
        overrides = list(args.set)
        if args.smoke_test:
            overrides = [f"{k}={v}" for k, v in SMOKE.items()] + overrides
        cfg = Config.from_yaml(args.config, overrides)
        data = args.data or "synthetic"
        if args.smoke_test and args.data is None:
            data = "synthetic:smoke"
    extra = {k: v for k, v in (("epochs", args.epochs), ("device", args.device), ("seed", args.seed)) if v is not None}
    if extra:
        cfg = cfg.replace(**extra)
        if args.resume:
            print(f"resume: applying {', '.join(f'{k}={v}' for k, v in extra.items())}", file=sys.stderr)
    return cfg, data, out, bool(args.resume)


def load_data(source: str, subset_users: int | None):
    from mmssl.data import load
    from mmssl.synthetic import generated_size, make_dataset

    if source == "synthetic:smoke":
        data = make_dataset(n_users=300, n_items=200, seed=0)
    elif source.startswith("synthetic:"):  # synthetic:UxI, as tune/search.py and analysis/ablation.py take it
        size = generated_size(source)
        if size is None:
            raise ConfigError(f"--data {source}: expected synthetic:UxI (e.g. synthetic:300x200)")
        data = make_dataset(n_users=size[0], n_items=size[1], seed=0)
    else:
        data = load(source)
    if subset_users:
        data = data.subset_users(subset_users, seed=0)
    return data


def _line(m: dict, epochs: int) -> str:
    return (f"epoch {m['epoch']:>3}/{epochs}  loss {m['train/loss']:.4f} (bpr {m['train/loss_bpr']:.4f} "
            f"cl {m['train/loss_cl']:.3f} g {m['train/loss_g']:.3f} d {m['train/loss_d']:.3f})  "
            f"val recall@20 {m['val/recall@20']:.4f} ndcg@20 {m['val/ndcg@20']:.4f}  "
            f"best {m['best/val/recall@20']:.4f}@{m['best/epoch']}  {m['time/epoch_s']:.1f}s")


def main(argv: list[str] | None = None) -> int:
    from mmssl.train import fit

    args = build_parser().parse_args(argv)
    cfg, source, out, resuming = _resolve(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data(source, args.subset_users).select_modalities(cfg.modalities)
    for w in caught:
        if issubclass(w.category, UserWarning) and "Sparse" not in str(w.message):
            print(f"warning: {w.message}", file=sys.stderr)
    print(f"data: {data.summary()}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if resuming:  # keep the lines up to the checkpoint's epoch; later ones are re-run
        import torch

        from mmssl.fingerprint import fingerprint
        from mmssl.train import check_resume

        ck = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
        check_resume(ck, cfg, fingerprint(data), out / "checkpoint.pt")  # before anything is rewritten
        ck_epoch = ck["epoch"]
        del ck
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["epoch"] <= ck_epoch]
        metrics_path.write_text("".join(ln + "\n" for ln in kept))
        print(f"resuming {out} after epoch {ck_epoch}", file=sys.stderr)
    else:
        (out / "config.yaml").write_text(cfg.to_yaml())
        (out / "run.json").write_text(jsonio.dumps({"data": source, "subset_users": args.subset_users,
                                                    "argv": sys.argv}, indent=1))

    def on_epoch(epoch, metrics, save_checkpoint):
        with metrics_path.open("a") as fh:
            fh.write(jsonio.dumps(metrics, why=METRIC_WHY) + "\n")
        save_checkpoint(out)
        print(_line(metrics, cfg.epochs), file=sys.stderr, flush=True)

    result = fit(cfg, data, on_epoch=on_epoch, resume_from=out if resuming else None,
                 progress=not args.quiet and sys.stderr.isatty())
    (out / "result.json").write_text(jsonio.dumps(result, indent=1, why=METRIC_WHY))
    print(f"best epoch {result['best_epoch']}: val recall@20 {result.get('val/recall@20', float('nan')):.4f}  "
          f"test recall@20 {result['test/recall@20']:.4f} ndcg@20 {result['test/ndcg@20']:.4f}  "
          f"({result['seconds']:.1f}s) -> {out}/result.json")
    return 0


def main_entry(argv: list[str] | None = None) -> int:
    return run_main(main, argv, prog="python -m mmssl.train")
