"""Before against after: a live update's downtime in two pyvmm trees, alternated.

    python3 bench/ab_downtime.py 84ce776 [--rounds 12] [--reps 2] [--sizes 256M,1G] [--early-start]

On a shared 2-core host the downtime of a cpr-transfer drifts by milliseconds
from one minute to the next, so two trees measured one after the other cannot be
compared.  This runs `pyvmm bench downtime` (cpr-transfer, the ticker, RAM
untouched) in the earlier tree (bench/release_tree.py builds it) and in this one
in turns, the order flipped every round, `--reps` updates per size a side each
round, then prints per size both sides' median and quartiles, the difference of
the medians with a bootstrap 95 % interval, and in how many rounds the second
tree was slower.  The earlier tree's benchmark may live in vmm/bench/ (before the
renovation) or bench/; both are found.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.release_tree import release_tree  # noqa: E402


def bench_module(tree: Path) -> str:
    return "bench.downtime" if (tree / "bench/downtime").is_dir() else "vmm.bench.downtime"


def run(tree: Path, sizes: str, reps: int, out: Path,
        extra: tuple[str, ...] = ()) -> dict[int, list[float]]:
    """One `bench downtime` run in `tree`: {RAM bytes: [host view ms, ...]}."""
    args = ["--sizes", sizes, "--modes", "transfer", "--ram", "untouched", "--loads", "idle",
            "--baselines", "none", "--reps", str(reps), "--no-progress", "--out", str(out),
            *extra]
    subprocess.run([str(tree / ".venv/bin/python"), "-m", bench_module(tree), *args],
                   cwd=tree, check=True, capture_output=True)
    by_size: dict[int, list[float]] = {}
    for r in json.loads((out / "results.json").read_text()):
        by_size.setdefault(r["size"], []).append(r["host_us"] / 1000)
    return by_size


def quartiles(v: list[float]) -> tuple[float, float, float]:
    s = sorted(v)
    return s[len(s) // 4], statistics.median(s), s[(3 * len(s)) // 4]


def bootstrap(a: list[float], b: list[float], n: int = 5000) -> tuple[float, float]:
    rnd = random.Random(1)
    d = sorted(statistics.median(rnd.choices(b, k=len(b))) -
               statistics.median(rnd.choices(a, k=len(a))) for _ in range(n))
    return d[int(0.025 * n)], d[int(0.975 * n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", help="a release or commit (built by bench/release_tree.py)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--sizes", default="256M,1G")
    ap.add_argument("--early-start", action="store_true",
                    help="cpr-transfer's early start on both sides (both trees must have it)")
    args = ap.parse_args(argv)
    extra = ("--early-start",) if args.early_start else ()
    trees = {"before": release_tree(args.before), "after": ROOT}
    runs: dict[str, list[dict[int, list[float]]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
                runs[side].append(run(trees[side], args.sizes, args.reps,
                                      Path(tmp) / f"{side}{r}", extra))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for size in sorted(runs["after"][0]):
        a = [x for one in runs["before"] for x in one[size]]
        b = [x for one in runs["after"] for x in one[size]]
        slower = sum(statistics.median(y[size]) > statistics.median(x[size])
                     for x, y in zip(runs["before"], runs["after"]))
        lo, hi = bootstrap(a, b)
        qa, qb = quartiles(a), quartiles(b)
        print(f"{size >> 20} MiB: before {qa[1]:.2f} ms ({qa[0]:.2f}-{qa[2]:.2f}), after "
              f"{qb[1]:.2f} ms ({qb[0]:.2f}-{qb[2]:.2f}), after - before "
              f"{qb[1] - qa[1]:+.2f} ms [{lo:+.2f}, {hi:+.2f}], after slower in {slower} "
              f"of {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
