"""A built checkout of an earlier pyvmm release, for upgrade tests and benchmarks.

    python3 bench/release_tree.py 0.1.0        # or a commit; prints the tree's path

A live update's reason to exist is replacing the VMM binary, so the upgrade test
(tests/test_upgrade.py) runs a guest under the previous release and updates it to
the working tree.  This module makes that release's tree: `git worktree add
--detach` of the commit RELEASES.md names, in a cache outside the checkout
(~/.cache/pyvmm/releases/COMMIT/, or $PYVMM_RELEASE_CACHE/COMMIT/), built with its
own `make build` (its own .venv, cffi modules and guests).  A stamp file written
last marks a finished build, so later calls reuse the tree at once; a build that
was interrupted is thrown away and made again.  A lock file keeps two callers
from building the same tree at the same time.

From Python: `release_tree("0.1.0")` returns the Path, `pyvmm_command(path)` the
command that runs its pyvmm; `previous_release()` is (version, commit) of the newest
release RELEASES.md lists.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP = ".pyvmm-release-built"
CACHE_ENV = "PYVMM_RELEASE_CACHE"
# A RELEASES.md row: | 0.1.0 | 70cd826ee31872fbec8e53c9342e73808a6a158a | ... |
_ROW = re.compile(r"^\|\s*(\d+\.\d+\.\d+)\s*\|\s*`?([0-9a-f]{7,40}|unreleased[^|]*)`?\s*\|")


class ReleaseTreeError(Exception):
    """The release tree cannot be made (one line saying why)."""


class MissingCommit(ReleaseTreeError):
    """The git history here lacks the release's commit (a shallow clone)."""


def releases(root: Path = ROOT) -> dict[str, str | None]:
    """RELEASES.md's table: version -> full or short commit (None: not released yet)."""
    out: dict[str, str | None] = {}
    for line in (root / "RELEASES.md").read_text().splitlines():
        m = _ROW.match(line)
        if m:
            commit = m.group(2)
            out[m.group(1)] = None if commit.startswith("unreleased") else commit
    return out


def previous_release(root: Path = ROOT) -> tuple[str, str]:
    """(version, commit) of the newest released version in RELEASES.md."""
    done = [(v, c) for v, c in releases(root).items() if c]
    if not done:
        raise ReleaseTreeError("RELEASES.md lists no released version")
    return max(done, key=lambda vc: tuple(int(x) for x in vc[0].split(".")))


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or
                Path.home() / ".cache" / "pyvmm" / "releases")


def resolve(rev: str, root: Path = ROOT) -> str:
    """The full commit of a release version (RELEASES.md) or any git revision."""
    version = re.fullmatch(r"\d+\.\d+\.\d+", rev)
    commit = releases(root).get(rev, "") if version else rev
    if commit == "":
        raise ReleaseTreeError(f"RELEASES.md lists no release {rev}")
    if commit is None:
        raise ReleaseTreeError(f"release {rev} is not released yet (RELEASES.md)")
    r = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", "--quiet",
                        f"{commit}^{{commit}}"], capture_output=True, text=True)
    if r.returncode != 0:
        raise MissingCommit(f"the git history lacks commit {commit}"
                            f"{f' (release {rev})' if version else ''}: a shallow clone? "
                            "(git fetch --unshallow)")
    return r.stdout.strip()


def is_built(tree: Path, commit: str) -> bool:
    stamp = tree / STAMP
    return (stamp.is_file() and stamp.read_text().strip() == commit and
            (tree / ".venv" / "bin" / "python").exists())


def release_tree(rev: str, *, root: Path = ROOT, log=None) -> Path:
    """The path of a built tree of `rev` (a release version or a commit), built now
    if it is not in the cache yet (~1-2 min); MissingCommit if git lacks it."""
    commit = resolve(rev, root)
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tree = cache / commit
    with open(cache / f"{commit}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_built(tree, commit):
            return tree
        _build(tree, commit, root, log or (lambda line: print(line, file=sys.stderr)))
    return tree


def pyvmm_command(tree: Path) -> list[str]:
    """How to run a release tree's pyvmm (its own interpreter and code; run it with
    cwd=tree): append the arguments, e.g. ["run", "--kernel", ...]."""
    return [str(tree / ".venv" / "bin" / "python"), "-m", "vmm"]


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)


def _build(tree: Path, commit: str, root: Path, log) -> None:
    if tree.exists():   # an interrupted build: start again from a clean checkout
        log(f"release tree {tree}: unfinished build, making it again")
        _git(root, "worktree", "remove", "--force", str(tree))
        shutil.rmtree(tree, ignore_errors=True)
    _git(root, "worktree", "prune")
    r = _git(root, "worktree", "add", "--detach", str(tree), commit)
    if r.returncode != 0:
        raise ReleaseTreeError(f"git worktree add {tree} {commit[:12]} failed: "
                               f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
    log(f"release tree {tree}: building {commit[:12]} (make build, once)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "MAKEFLAGS", "MFLAGS",
                        "MAKELEVEL")}
    with open(tree / ".build.log", "w") as out:
        r = subprocess.run(["make", "-C", str(tree), "build"], stdout=out,
                           stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        tail = (tree / ".build.log").read_text(errors="replace").strip().splitlines()[-1:]
        raise ReleaseTreeError(f"make build of {commit[:12]} in {tree} failed "
                               f"(see {tree}/.build.log): {tail[0] if tail else '?'}")
    (tree / STAMP).write_text(commit + "\n")


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python3 bench/release_tree.py VERSION|COMMIT   (prints the built "
              "tree's path)", file=sys.stderr)
        return 2
    try:
        print(release_tree(args[0]))
    except ReleaseTreeError as e:
        print(f"release_tree: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
