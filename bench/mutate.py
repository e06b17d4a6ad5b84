"""Targeted mutation run over MMSSL's equations and evaluation protocol.

Run from the repository root:

    python bench/mutate.py --list                          # every candidate mutant, no test run
    python bench/mutate.py --max 150 --out bench/mutation_after.json
    python bench/mutate.py --max 150 --tests-ref e73a31a --out bench/mutation_before.json
                                                           # the suite as it was at a commit
    python bench/mutate.py --smoke-test                    # 3 mutants, seconds to a minute

What it does: parses the target functions of ``mmssl/losses.py``, ``mmssl/model.py``,
``mmssl/graph.py`` (the generator graph), ``mmssl/metrics.py`` and the protocol parts of
``mmssl/train.py`` (``TARGETS``) with :mod:`ast`, enumerates small semantic mutations
(``+``/``-``, ``*``/``/``, comparisons, numeric constants, ``True``/``False``, ``dim=``
arguments, ``mean``/``sum``, a call replaced by its first argument such as
``F.normalize(x)`` -> ``x``, one element dropped from a list literal, unary minus dropped),
draws at most ``--max`` of them with a seeded generator (the same draw for the same
source), and for each one writes the mutated file into a private copy of the repository
and runs only that file's fast tests (``pytest -x``, ``--timeout`` seconds). A mutant is
*killed* when the tests fail (or time out), *survived* when they pass. Survivors listed in
``bench/mutation_equivalent.json`` (mutant id -> reason) are counted as *equivalent*.

Output: one line per mutant, a summary (tried / killed / survived / equivalent) and, with
``--out``, a JSON file with every mutant's id, description and outcome. Uses one process:
about 5-15 s per mutant on a shared CPU.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST_TRAIN = "not cli and not full_model_beats"
# the value tests first: pytest -x stops at the first failure, so a killed mutant ends early
MODEL_TESTS = ["tests/test_equations.py", "tests/test_released_defects.py", "tests/test_model.py"]
PROTOCOL_TESTS = ["tests/test_protocol.py", "tests/test_released_defects.py", "tests/test_metrics.py"]
TRAIN_TESTS = ["tests/test_protocol.py", "tests/test_released_defects.py", "tests/test_train.py"]
# file -> (qualified function names to mutate, test files, -k expression or None)
TARGETS = {
    "mmssl/losses.py": (["bpr_loss", "l2_penalty", "info_nce", "fake_rows", "gumbel_real_rows",
                         "gradient_penalty", "discriminator_loss", "generator_loss"], MODEL_TESTS, None),
    "mmssl/model.py": (["modality_projection", "modality_views", "modality_id_views",
                        "InterModalAttention.forward", "gnn", "fusion", "MMSSL.propagate",
                        "MMSSL.forward", "Discriminator.__init__", "Discriminator.forward"], MODEL_TESTS, None),
    "mmssl/graph.py": (["observed_operators", "_inv_sqrt", "topk_count", "generator_graph", "block_size",
                        "largest_k", "blocked_topk_cols", "sorted_pattern", "_sorted_pattern_torch",
                        "modality_id_operators"], ["tests/test_rebuild.py", *MODEL_TESTS], None),
    "mmssl/metrics.py": (["_row_metrics", "_rank_rows", "_exact_order", "_candidates", "rank_metrics",
                          "evaluate"], PROTOCOL_TESTS, None),
    "mmssl/train.py": (["Run.evaluate", "Run.record", "Run.done", "fit", "Run.train_epoch"],
                       TRAIN_TESTS, FAST_TRAIN),
}
BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
          ast.Pow: ast.Mult}
CMPOPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
          ast.NotEq: ast.Eq}
METHOD_SWAPS = {"mean": "sum", "sum": "mean", "max": "min", "min": "max", "minimum": "maximum",
                "maximum": "minimum"}
UNWRAP = {"normalize", "detach", "softmax", "softplus", "sigmoid", "log", "sqrt", "relu", "clamp",
          "clamp_", "mean", "sum", "abs", "dropout", "rsqrt", "log2"}
DIM_SWAP = {1: 0, 0: 1, -1: -2, -2: -1}


def _functions(tree: ast.Module, names: list[str]):
    """(qualified name, node) of the target function definitions."""
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef):
                    found[f"{node.name}.{sub.name}"] = sub
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"error: functions not found: {', '.join(missing)}")
    return [(n, found[n]) for n in names]


def _candidates(node: ast.AST):
    """Yield (description, apply) for every mutation inside ``node``; apply mutates in place."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.BinOp) and type(sub.op) in BINOPS:
            new = BINOPS[type(sub.op)]
            yield (f"{type(sub.op).__name__}->{new.__name__}", sub, lambda s, new=new: setattr(s, "op", new()))
        elif isinstance(sub, ast.Compare) and len(sub.ops) == 1 and type(sub.ops[0]) in CMPOPS:
            new = CMPOPS[type(sub.ops[0])]
            yield (f"{type(sub.ops[0]).__name__}->{new.__name__}", sub, lambda s, new=new: setattr(s, "ops", [new()]))
        elif isinstance(sub, ast.UnaryOp) and isinstance(sub.op, ast.USub) and not isinstance(sub.operand, ast.Constant):
            yield ("drop unary minus", sub, "unwrap-unary")
        elif isinstance(sub, ast.Constant) and type(sub.value) is bool:
            yield (f"{sub.value}->{not sub.value}", sub, lambda s: setattr(s, "value", not s.value))
        elif isinstance(sub, ast.Constant) and type(sub.value) in (int, float) and not isinstance(sub.value, bool):
            v = sub.value
            new = (v + 1) if isinstance(v, int) else (v * 2 if v else 1.0)
            yield (f"const {v!r}->{new!r}", sub, lambda s, new=new: setattr(s, "value", new))
        elif isinstance(sub, ast.keyword) and sub.arg == "dim" and isinstance(sub.value, (ast.Constant, ast.UnaryOp)):
            try:
                v = ast.literal_eval(sub.value)
            except ValueError:
                continue
            if v in DIM_SWAP:
                new = DIM_SWAP[v]
                yield (f"dim={v}->dim={new}", sub, lambda s, new=new: setattr(s, "value", ast.Constant(new)))
        elif isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute):
            name = sub.func.attr
            if name in METHOD_SWAPS:
                new = METHOD_SWAPS[name]
                yield (f".{name}->.{new}", sub, lambda s, new=new: setattr(s.func, "attr", new))
            if name in UNWRAP:
                yield (f"{name}(x, ...)->x", sub, "unwrap-call")
        elif isinstance(sub, ast.List) and len(sub.elts) >= 2:
            for j in range(len(sub.elts)):
                yield (f"drop list element {j}", sub, lambda s, j=j: s.elts.pop(j))


def _replace_child(parent_tree: ast.AST, target: ast.AST, replacement: ast.AST) -> None:
    for node in ast.walk(parent_tree):
        for field, value in ast.iter_fields(node):
            if value is target:
                setattr(node, field, replacement)
                return
            if isinstance(value, list):
                for k, item in enumerate(value):
                    if item is target:
                        value[k] = replacement
                        return
    raise RuntimeError("node not found")


def enumerate_mutants(root: Path = ROOT) -> list[dict]:
    """Every candidate mutant: id, file, function, line, description (deterministic order)."""
    out = []
    for rel, (names, _, _) in TARGETS.items():
        src = (root / rel).read_text()
        tree = ast.parse(src)
        for qual, fn in _functions(tree, names):
            body_nodes = fn.body[1:] if (fn.body and isinstance(fn.body[0], ast.Expr)
                                         and isinstance(fn.body[0].value, ast.Constant)) else fn.body
            k = 0
            for stmt in body_nodes:
                for desc, node, _ in _candidates(stmt):
                    line = getattr(node, "lineno", fn.lineno)
                    out.append({"id": f"{rel}:{qual}:{line}:{k}:{desc}", "file": rel, "function": qual,
                                "line": line, "index": k, "desc": desc})
                    k += 1
    return out


def mutated_source(m: dict, original: str) -> str:
    """``original`` (the source of ``m['file']``) with mutant ``m`` applied (re-parsed, so the ids line up)."""
    tree = ast.parse(original)
    names, _, _ = TARGETS[m["file"]]
    fn = dict(_functions(tree, names))[m["function"]]
    body_nodes = fn.body[1:] if (fn.body and isinstance(fn.body[0], ast.Expr)
                                 and isinstance(fn.body[0].value, ast.Constant)) else fn.body
    k = 0
    for stmt in body_nodes:
        for desc, node, apply in _candidates(stmt):
            if k == m["index"]:
                assert desc == m["desc"], (desc, m)
                if apply == "unwrap-unary":
                    _replace_child(tree, node, node.operand)
                elif apply == "unwrap-call":
                    first = node.args[0] if node.args else node.func.value
                    _replace_child(tree, node, first)
                else:
                    apply(node)
                return ast.unparse(ast.fix_missing_locations(tree))
            k += 1
    raise RuntimeError(f"mutant not found: {m['id']}")


def run_tests(work: Path, rel: str, timeout: float) -> tuple[str, float]:
    _, tests, kexpr = TARGETS[rel]
    tests = [t for t in tests if (work / t).is_file()]
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    if kexpr:
        cmd += ["-k", kexpr]
    env = dict(os.environ, PYTHONPATH=str(work), OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return "killed (timeout)", time.perf_counter() - t0
    if rc == 0:
        return "survived", time.perf_counter() - t0
    if rc in (1, 2):  # failures / collection or import errors
        return "killed", time.perf_counter() - t0
    if rc < 0:  # the test process died of a signal (e.g. a segfault in a sparse kernel): the suite fails
        return "killed (crash)", time.perf_counter() - t0
    return f"error rc={rc}", time.perf_counter() - t0


def make_copy(tests_ref: str | None) -> Path:
    work = Path(tempfile.mkdtemp(prefix="mmssl-mut-"))
    for name in ("mmssl", "tests"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
    if tests_ref:  # the test suite as it was at a commit (for the "before" figures)
        shutil.rmtree(work / "tests")
        files = subprocess.run(["git", "ls-tree", "--name-only", tests_ref, "tests/"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split()
        (work / "tests").mkdir()
        for f in files:
            blob = subprocess.run(["git", "show", f"{tests_ref}:{f}"], cwd=ROOT, check=True,
                                  capture_output=True).stdout
            (work / f).write_bytes(blob)
    return work


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max", type=int, default=150, help="most mutants to run (seeded draw; default 150)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant's tests (default 120)")
    p.add_argument("--tests-ref", default=None, help="a git commit: use the tests/ folder as it was there")
    p.add_argument("--out", default=None, help="write every mutant's outcome to this JSON file")
    p.add_argument("--rerun", default=None, metavar="JSON",
                   help="a previous --out file: re-run only its survivors (and equivalents), keep its kills "
                        "(valid when the tests only grew since: a killed mutant stays killed)")
    p.add_argument("--list", action="store_true", help="list the drawn mutants and exit")
    p.add_argument("--smoke-test", action="store_true", help="3 mutants only")
    a = p.parse_args(argv)
    if a.max < 1 or a.timeout <= 0:
        print("error: --max and --timeout must be positive", file=sys.stderr)
        return 2
    everything = enumerate_mutants()
    n = 3 if a.smoke_test else min(a.max, len(everything))
    drawn = sorted(random.Random(a.seed).sample(range(len(everything)), n))
    mutants = [everything[i] for i in drawn]
    if a.list:
        for m in mutants:
            print(m["id"])
        print(f"{len(mutants)} of {len(everything)} candidates", file=sys.stderr)
        return 0
    equiv_path = ROOT / "bench" / "mutation_equivalent.json"
    equivalent = json.loads(equiv_path.read_text()) if equiv_path.is_file() else {}
    work = make_copy(a.tests_ref)  # sources are read from this private copy from here on
    kept = []
    if a.rerun:
        previous = json.loads(Path(a.rerun).read_text())["mutants"]
        if [m["id"] for m in previous] != [m["id"] for m in mutants]:
            print(f"error: {a.rerun} holds a different draw of mutants (other --max/--seed or sources)",
                  file=sys.stderr)
            return 2
        kept = [m for m in previous if m["status"].startswith("killed")]
        kept_ids = {m["id"] for m in kept}
        mutants = [m for m in mutants if m["id"] not in kept_ids]
    try:
        for rel in sorted({m["file"] for m in mutants}):  # the unmutated code must pass
            status, secs = run_tests(work, rel, a.timeout * 3)
            if status != "survived":
                print(f"error: unmutated {rel} fails its tests ({status}); fix the suite first", file=sys.stderr)
                return 2
        results = []
        for j, m in enumerate(mutants, 1):
            original = (work / m["file"]).read_text()
            (work / m["file"]).write_text(mutated_source(m, original))
            try:
                status, secs = run_tests(work, m["file"], a.timeout)
            finally:
                (work / m["file"]).write_text(original)
            if status == "survived" and m["id"] in equivalent:
                status = "equivalent"
            results.append({**m, "status": status, "seconds": round(secs, 1),
                            "reason": equivalent.get(m["id"])})
            print(f"[{j}/{len(mutants)}] {status:17s} {secs:5.1f}s  {m['id']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = sorted(kept + results, key=lambda r: [x["id"] for x in everything].index(r["id"]))
    count = lambda s: sum(r["status"].startswith(s) for r in results)  # noqa: E731
    summary = {"candidates": len(everything), "tried": len(results), "killed": count("killed"),
               "survived": count("survived"), "equivalent": count("equivalent"), "errors": count("error"),
               "tests_ref": a.tests_ref or "working tree", "seed": a.seed, "rerun_of": a.rerun}
    print(json.dumps(summary))
    for r in results:
        if r["status"] in ("survived", "equivalent"):
            print(f"  {r['status']}: {r['id']}" + (f"  ({r['reason']})" if r["reason"] else ""))
    if a.out:
        Path(a.out).write_text(json.dumps({"summary": summary, "mutants": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
