"""QEMU 10.2.2 built from Debian's source package, for the downtime benchmark's baseline.

    python3 bench/qemu10.py     # builds once (4-15 min on 2 cores); prints the binary

pyvmm's live update is modelled on QEMU 10's cpr-transfer and cpr-exec, so the fair
baseline is that QEMU on the same host and guest.  Debian bookworm ships QEMU 7.2
(no CPR modes), so this script builds QEMU 10.2.2 from Debian unstable's source
package, on demand and outside the checkout (~/.cache/pyvmm/qemu-10.2.2/, or
$PYVMM_QEMU10_CACHE):

1. the build dependencies from bookworm (apt-get install, a no-op when present);
2. a deb-src entry for unstable in its own sources file, `apt-get source` of the
   version that is 10.2.2 (apt-cache showsrc), and the entry removed again (with an
   `apt-get update`) whether or not that worked, so the host never installs from
   unstable;
3. meson >= 1.5 from PyPI in a tools venv (bookworm's meson is too old), handed to
   QEMU's configure as its Python;
4. configure and ninja: only x86_64-softmmu with KVM and FDT, no docs, tools, user
   mode or firmware blobs.  The binary runs from the build tree with
   `-L /usr/share/qemu` (bookworm's firmware: qemu-system-data, seabios).

A stamp file written last marks a finished build, so later calls only print the
path; an interrupted build starts again from scratch.  A lock file keeps two
callers from building at once.  Not part of `make test`: the downtime benchmark
skips its qemu10 baseline, saying how to get it, when the binary is absent.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

VERSION = "10.2.2"
CACHE_ENV = "PYVMM_QEMU10_CACHE"
STAMP = ".pyvmm-qemu-built"
FIRMWARE_DIR = "/usr/share/qemu"      # bookworm's qemu-system-data: `-L` at run time
BUILD_DEPS = ["dpkg-dev", "gcc", "ninja-build", "pkg-config", "python3-venv",
              "libglib2.0-dev", "libfdt-dev", "libpixman-1-dev", "zlib1g-dev"]
DEB_SRC_FILE = Path("/etc/apt/sources.list.d/pyvmm-qemu10-unstable-src.list")
DEB_SRC_LINE = "deb-src http://deb.debian.org/debian unstable main\n"
CONFIGURE_FLAGS = ["--target-list=x86_64-softmmu", "--enable-kvm", "--enable-fdt",
                   "--disable-docs", "--disable-werror", "--disable-tools",
                   "--disable-user", "--disable-install-blobs"]
HOW_TO_BUILD = f"python3 bench/qemu10.py (builds QEMU {VERSION} once, 4-15 min)"


class Qemu10Error(Exception):
    """QEMU 10 cannot be built (one line saying why)."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or
                Path.home() / ".cache" / "pyvmm" / f"qemu-{VERSION}")


def binary(cache: Path | None = None) -> Path | None:
    """The built qemu-system-x86_64, or None when it is not built yet."""
    cache = cache or cache_dir()
    stamp = cache / STAMP
    if not stamp.is_file():
        return None
    path = Path(stamp.read_text().split("\n")[0].strip())
    return path if path.is_file() and os.access(path, os.X_OK) else None


def source_version() -> str:
    """The Debian version the last build used (e.g. '1:10.2.2+ds-1'), or ''."""
    stamp = cache_dir() / STAMP
    lines = stamp.read_text().splitlines() if stamp.is_file() else []
    return lines[1].strip() if len(lines) > 1 else ""


def build(log=None) -> Path:
    """The path of the built binary, building it now if the cache lacks it."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = binary(cache)
        if found:
            return found
        return _build(cache, log)


def pick_version(showsrc: str, want: str = VERSION) -> str:
    """The Debian version of `apt-cache showsrc qemu` whose upstream part is `want`,
    else the newest 10.2.x there (the caller says so); Qemu10Error if neither."""
    versions = re.findall(r"^Version:\s*(\S+)", showsrc, re.M)

    def upstream(v: str) -> str:
        return re.sub(r"^\d+:", "", v).split("-")[0].split("+")[0].split("~")[0]
    exact = [v for v in versions if upstream(v) == want]
    if exact:
        return exact[0]
    series = ".".join(want.split(".")[:2]) + "."
    near = sorted((v for v in versions if upstream(v).startswith(series)),
                  key=lambda v: [int(x) for x in upstream(v).split(".")])
    if near:
        return near[-1]
    raise Qemu10Error(f"Debian unstable has no qemu {series}x source (it has "
                      f"{', '.join(versions) or 'none'})")


def _run(cmd: list[str], logfile: Path, **kw) -> str:
    with open(logfile, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, text=True, errors="replace", **kw)
        out.write(r.stdout)
    if r.returncode != 0:
        tail = (r.stdout.strip().splitlines() or ["?"])[-1]
        raise Qemu10Error(f"`{' '.join(cmd[:4])}` failed (see {logfile}): {tail}")
    return r.stdout


def _fetch_source(work: Path, logfile: Path, log) -> tuple[Path, str]:
    """apt-get source of unstable's qemu 10.2.x into `work`: (source dir, version)."""
    DEB_SRC_FILE.write_text(DEB_SRC_LINE)
    try:
        _run(["apt-get", "update"], logfile)
        version = pick_version(_run(["apt-cache", "showsrc", "qemu"], logfile))
        log(f"qemu10: Debian unstable source qemu {version}")
        _run(["apt-get", "source", "--only-source", f"qemu={version}"], logfile, cwd=work)
    finally:
        DEB_SRC_FILE.unlink(missing_ok=True)
        subprocess.run(["apt-get", "update"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    dirs = [d for d in work.iterdir() if d.is_dir() and d.name.startswith("qemu-")]
    if len(dirs) != 1:
        raise Qemu10Error(f"apt-get source left {len(dirs)} qemu-* directories in {work}")
    return dirs[0], version


def _build(cache: Path, log) -> Path:
    if os.geteuid() != 0:
        raise Qemu10Error("building QEMU 10 needs root (apt-get); run it with sudo")
    for old in ("src", "tools", "build.log"):
        path = cache / old
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    logfile = cache / "build.log"
    work = cache / "src"
    work.mkdir()
    log(f"qemu10: building QEMU {VERSION} in {cache} (once; 4-15 min; log: {logfile})")
    _run(["apt-get", "install", "-y", "--no-install-recommends", *BUILD_DEPS], logfile)
    src, version = _fetch_source(work, logfile, log)
    if not re.search(rf"(^|:){re.escape(VERSION)}[+~-]", version):
        log(f"qemu10: note: unstable has {version}, not {VERSION}: building that")
    tools = cache / "tools"
    _run([sys.executable, "-m", "venv", str(tools)], logfile)
    _run([str(tools / "bin" / "pip"), "install", "--quiet", "meson>=1.5"], logfile)
    build_dir = src / "build"
    build_dir.mkdir()
    log("qemu10: configure")
    _run(["../configure", f"--python={tools / 'bin' / 'python3'}", *CONFIGURE_FLAGS],
         logfile, cwd=build_dir)
    log(f"qemu10: ninja -j{os.cpu_count()} (the long part)")
    _run(["ninja", f"-j{os.cpu_count()}", "qemu-system-x86_64"], logfile, cwd=build_dir)
    path = build_dir / "qemu-system-x86_64"
    out = _run([str(path), "-L", FIRMWARE_DIR, "--version"], logfile)
    log(f"qemu10: built {out.splitlines()[0]}")
    (cache / STAMP).write_text(f"{path}\n{version}\n")
    return path


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    try:
        print(build())
    except Qemu10Error as e:
        print(f"qemu10: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
