"""The teaching labs in docs/labs/ run for real, so they never rot.

Each lab's ```console blocks are turned into one bash script: a line `$ CMD` is a
command the student types (a trailing `\\` continues it on the next line, and so do
lines starting `> `, as bash shows a here-document), the
lines after it are its expected output. An output line ending in `  # expect` must
appear in that command's output, with every number and absolute path in it
(and the width of runs of spaces) allowed to vary; one
ending in `  # exact` must appear verbatim. A command followed by `echo $?` may
fail (the student looks at its status); any other command must succeed.

The script runs the way a student runs a lab: an interactive bash (`bash -i`, job
control on) on a pseudo-terminal of its own, from the repository root, with this
interpreter's venv activated (its bin first in PATH: the installed `pyvmm` entry
point and the venv's `python3`, as after `. .venv/bin/activate`) and TMPDIR pointing
at a fresh directory (labs take their work directory from `mktemp -d`). It runs in its own session, whose
controlling terminal is that pty;
whatever is left in that session at the end (a VMM a lab started with `&`, a
holder) is killed, and every lab must leave no process behind by itself.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, need_kvm

LABS = ROOT / "docs" / "labs"
LAB_FILES = sorted(p.name for p in LABS.glob("[0-9][0-9]-*.md"))
TIMEOUT = 90.0   # a hang, not a speed limit: a lab takes 3-20 s here, more on a busy host
MARK = "__LAB_STEP__"


# -- parsing ---------------------------------------------------------------------------------
class Step:
    def __init__(self, cmd: str, lineno: int):
        self.cmd = cmd
        self.lineno = lineno
        self.expect: list[tuple[str, str]] = []   # (kind, text)

    @property
    def background(self) -> bool:
        return self.cmd.rstrip().endswith("&")


def parse_lab(text: str) -> list[Step]:
    steps: list[Step] = []
    in_block = False
    pending: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_block = line.strip() == "```console" if not in_block else False
            continue
        if not in_block:
            continue
        if pending:                          # continuation of a `\`-ended command
            pending.append(line)
            if not line.endswith("\\"):
                steps[-1].cmd = "\n".join(pending)
                pending = []
            continue
        if line.startswith("> ") and steps and not steps[-1].expect:   # bash's PS2
            steps[-1].cmd += "\n" + line[2:]
            continue
        if line.startswith("$ "):
            steps.append(Step(line[2:], n))
            if line.endswith("\\"):
                pending = [line[2:]]
            continue
        m = re.match(r"^(.*?)\s+# (expect|exact)$", line)
        if m:
            assert steps, f"line {n}: expected output before any command"
            steps[-1].expect.append((m.group(2), m.group(1)))
    return steps


def pattern_for(text: str) -> re.Pattern:
    """A regex for an expected line: every number (decimal or hex) and every absolute
    path (a word starting with `/`: the Python, a `mktemp -d` directory) may vary, and
    so may the width of the spaces between words."""
    out = []
    for tok in re.split(r"((?<!\S)/\S*|0x[0-9a-fA-F]+|\d+(?:\.\d+)?)", text):
        if not tok:
            continue
        if tok.startswith("/"):
            out.append(r"/\S*")
        elif tok.startswith("0x"):
            out.append(r"0x[0-9a-fA-F]+")
        elif tok[0].isdigit():
            out.append(r"\d+(?:\.\d+)?")
        else:    # columns shift when a number gets wider: any run of spaces will do
            out.append(r"\s+".join(re.escape(part) for part in re.split(r"\s+", tok)))
    return re.compile("".join(out))


def build_script(steps: list[Step]) -> str:
    lines = ["set -u", "cd " + _q(str(ROOT))]
    for i, s in enumerate(steps):
        lines.append(s.cmd)
        # Record the status, then give it back so that a following `echo $?` sees it.
        lines.append(f'__rc=$?; echo "{MARK} {i} $__rc"; (exit $__rc)')
    return "\n".join(lines) + "\n"


def _q(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def split_output(out: str, n: int) -> tuple[list[str], list[int]]:
    chunks, rcs, cur = [], [], []
    for line in out.splitlines():
        m = re.match(rf"^(.*){MARK} (\d+) (\d+)$", line)
        if m:
            cur.append(m.group(1))
            chunks.append("\n".join(cur))
            rcs.append(int(m.group(3)))
            cur = []
        else:
            cur.append(line)
    return chunks, rcs


# -- running -----------------------------------------------------------------------------------
def session_pids(sid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state, fields[3] the session. A zombie is not running and
        # cannot be killed (cpr-exec's holder is one for a moment, until the new image reaps it).
        if int(fields[3]) == sid and fields[0] != "Z" and int(d) != os.getpid():
            pids.append(int(d))
    return pids


def _drain(fd: int, chunks: list[bytes]) -> None:
    """Read the terminal's output until every process has closed it (EIO)."""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return
        if not data:
            return
        chunks.append(data)


def stopped_in_session(sid: int) -> list[int]:
    """Processes of the session stopped by job control (state T): a frozen VMM."""
    out = []
    for pid in session_pids(sid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "T":
                    out.append(pid)
        except OSError:
            pass
    return out


def kill_session(sid: int) -> list[int]:
    left = session_pids(sid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.05)
    return left


def run_lab(name: str, tmp_path: Path):
    steps = parse_lab((LABS / name).read_text())
    assert steps, f"{name}: no ```console commands"
    # The venv's own bin first in PATH, as `. .venv/bin/activate` does: `pyvmm` is
    # the installed entry point and `python3` the venv's, so `ps` shows what a
    # student's shows.
    venv = Path(sys.prefix)
    bindir = venv / "bin"
    if sys.prefix == sys.base_prefix or not (bindir / "pyvmm").exists():
        pytest.fail(f"the labs run pyvmm as installed in a venv (make build); "
                    f"{sys.executable} is not a venv's interpreter with a pyvmm entry point")
    work = tmp_path / "tmp"
    work.mkdir()
    script = tmp_path / "lab.sh"
    script.write_text(build_script(steps))
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", TMPDIR=str(work),
               VIRTUAL_ENV=str(venv))
    log = tmp_path / "out.txt"
    # As a student runs it: an interactive bash with job control on a terminal of
    # its own, so `cmd &` makes a background job that the terminal would stop if it
    # read from it (SIGTTIN), and stdin is that terminal, not /dev/null.
    master, slave = os.openpty()
    proc = subprocess.Popen(["bash", "--norc", "--noprofile", "-i", str(script)],
                            stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env,
                            start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    chunks: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(master, chunks), daemon=True)
    reader.start()
    try:
        proc.wait(TIMEOUT)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    stopped = stopped_in_session(proc.pid)
    leftover = kill_session(proc.pid)
    proc.wait()
    reader.join(5)
    os.close(master)
    log.write_bytes(b"".join(chunks))
    text = log.read_text(errors="replace")
    return steps, text, timed_out, leftover, work, stopped


def leftovers(work: Path) -> list[str]:
    return [str(p.relative_to(work)) for p in work.rglob("*") if p.is_socket()]


@pytest.mark.parametrize("name", LAB_FILES)
def test_lab(name, guests, tmp_path):
    need_kvm()
    steps, text, timed_out, leftover, work, stopped = run_lab(name, tmp_path)
    assert not stopped, f"{name}: processes stopped by the terminal (SIGTTIN?): {stopped}"
    assert not timed_out, f"{name} took more than {TIMEOUT}s; output:\n{text[-4000:]}"
    chunks, rcs = split_output(text, len(steps))
    assert len(rcs) == len(steps), f"{name}: the script stopped early; output:\n{text[-4000:]}"
    for i, s in enumerate(steps):
        nxt = steps[i + 1].cmd.strip() if i + 1 < len(steps) else ""
        if rcs[i] != 0 and not nxt.startswith("echo $?"):
            pytest.fail(f"{name}:{s.lineno}: `{s.cmd}` exited {rcs[i]}; its output:\n{chunks[i]}")
        out_lines = [ln.rstrip("\r") for ln in chunks[i].splitlines()]
        for kind, want in s.expect:
            if kind == "exact":
                ok = any(ln.rstrip() == want.rstrip() for ln in out_lines)
            else:
                rx = pattern_for(want.strip())
                ok = any(rx.search(ln) for ln in out_lines)
            assert ok, (f"{name}:{s.lineno}: `{s.cmd}` did not print a line like {want!r}; "
                        f"it printed:\n{chunks[i]}")
    assert not leftover, f"{name} left processes running: {leftover}"
    assert not leftovers(work), f"{name} left sockets behind: {leftovers(work)}"


def test_labs_indexed():
    index = (LABS / "README.md").read_text()
    assert len(LAB_FILES) == 6
    for name in LAB_FILES:
        assert f"({name})" in index, f"docs/labs/README.md does not link {name}"


def test_parser():
    steps = parse_lab("text\n```console\n$ echo hi  # a comment\nhi  # exact\n$ a \\\n  b &\n"
                      "tick 3 t_us=10  # expect\n$ cat <<EOF\n> x\n> EOF\n```\n$ not a command\n")
    assert [s.cmd for s in steps] == ["echo hi  # a comment", "a \\\n  b &", "cat <<EOF\nx\nEOF"]
    assert steps[0].expect == [("exact", "hi")]
    assert steps[1].background
    assert pattern_for("tick 3 t_us=10 rip=0x1f").search("tick 44 t_us=123456 rip=0xabc")
    assert pattern_for(" 12 /usr/bin/python3 -m vmm --qmp /tmp/x/vm.qmp").search(
        " 345 /opt/venv/bin/python3 -m vmm --qmp /tmp/pytest-1/tmp.ab/vm.qmp")
    assert not pattern_for("ring3: ok").search("ring3: failed")
