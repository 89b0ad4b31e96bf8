"""`pyvmm cpr --trace` in causal order and `--trace-plot`, as a student runs them.

The ordering test runs under CPU load it makes itself (one busy loop per core):
that is when a sending thread, descheduled right after sendmsg, used to stamp its
send after the receiver had already stamped the receipt.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys

import pytest

from conftest import need_kvm, run_pyvmm
from test_cpr import start_incoming, start_ticker

pytestmark = pytest.mark.usefixtures("kvm")


@pytest.fixture(scope="module")
def kvm():
    need_kvm()


@contextlib.contextmanager
def cpu_load():
    """A busy loop on every core, bounded (they exit by themselves after 60 s)."""
    loops = [subprocess.Popen([sys.executable, "-c",
                               "import time\nend = time.monotonic() + 60\n"
                               "while time.monotonic() < end: pass"])
             for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for p in loops:
            p.kill()
            p.wait()


def trace_lines(out: str) -> list[tuple[float, str]]:
    """(ms, text) of each timeline line of `--trace` output, in printed order."""
    lines = []
    for line in out.splitlines():
        m = re.match(r"^(\w*)\s+(\d+\.\d+) ms\s+(?:[\d.]+ ms|-)?\s*(.*)$", line)
        if m:
            lines.append((float(m.group(2)), m.group(1) or m.group(3)))
    return lines


def index(lines, text) -> int:
    for i, (_, what) in enumerate(lines):
        if what == text if " " not in text else text in what:   # a phase, or a step
            return i
    raise AssertionError(f"{text!r} not in the trace: {[w for _, w in lines]}")


def assert_before(lines, *texts):
    at = [index(lines, t) for t in texts]
    assert at == sorted(at), f"not in causal order {texts}: {[w for _, w in lines]}"


def run_transfer(vmm_procs, tmp_path, *extra):
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    new, sock, new_qmp = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 3 ")
    r = run_pyvmm("cpr", "--mode", "transfer", "--socket", str(old_qmp), "--uri", str(sock),
                  "--new-qmp", str(new_qmp), *extra)
    assert r.returncode == 0, r.stderr
    return r


def run_exec(vmm_procs, tmp_path, *extra):
    old, qmp_path = start_ticker(vmm_procs, tmp_path)
    old.wait_for(r"tick 3 ")
    r = run_pyvmm("cpr", "--mode", "exec", "--socket", str(qmp_path), *extra)
    assert r.returncode == 0, r.stderr
    return r


def check_transfer_order(out):
    lines = trace_lines(out)
    assert [t for t, _ in lines] == sorted(t for t, _ in lines), out
    assert_before(lines, "setup", "stop", "quiesce", "notify", "save", "transfer",
                  "old: state memfd and device fds sent", "restore", "new: state blob loaded",
                  "new: vCPU, VM and device state written", "new: guest claimed", "resume")


def check_exec_order(out):
    lines = trace_lines(out)
    assert [t for t, _ in lines] == sorted(t for t, _ in lines), out
    assert_before(lines, "stop", "save", "transfer", "new image: Python runs its first line",
                  "new image: state blob loaded", "new image: waited for the prebuilder",
                  "new image: machine built", "new image: device state written",
                  "new image: early vCPU threads stopped",
                  "new image: Python's vCPU threads run the guest")
    # the early start: the prebuilder restores and runs the guest (restore, resume), and
    # the main thread joins it after that
    assert_before(lines, "transfer", "prebuilder (C, before Python's main): started",
                  "restore", "prebuilder: VM, memory slots", "resume",
                  "prebuilder: vCPU, VM and irqchip state restored, vCPUs running",
                  "new image: waited for the prebuilder")
    # the prebuilder's steps are shown as concurrent, and the output says what that means
    assert re.search(r"‖ prebuilder: VM, memory slots", out), out
    assert "by the clock, not by cause" in out


@pytest.mark.parametrize("mode", ["transfer", "exec"])
def test_trace_in_causal_order_under_load(guests, vmm_procs, tmp_path, mode):
    for rep in range(3):
        d = tmp_path / str(rep)
        d.mkdir()
        with cpu_load():
            if mode == "transfer":
                check_transfer_order(run_transfer(vmm_procs, d, "--trace").stdout)
            else:
                check_exec_order(run_exec(vmm_procs, d, "--trace").stdout)


# -- --trace-plot -----------------------------------------------------------------------
def svg_texts(path) -> str:
    """Every text element of a plot (SVG with text kept as text), one per line."""
    import html
    body = path.read_text()
    assert body.lstrip().startswith(("<?xml", "<svg")), body[:200]
    return "\n".join(html.unescape(t) for t in re.findall(r"<text[^>]*>(.*?)</text>", body,
                                                           re.S))


def downtime_ms(out: str) -> str:
    return re.search(r"downtime (\d+\.\d\d) ms", out).group(1)


def test_trace_plot_transfer(guests, vmm_procs, tmp_path):
    plot = tmp_path / "transfer.svg"
    r = run_transfer(vmm_procs, tmp_path, "--trace-plot", str(plot))
    text = svg_texts(plot)
    for label in ("old pyvmm", "new pyvmm", "guest RAM", "hello + RAM memfd", "prepared",
                  "state + device fds", "go (point of no return): commit page claimed", "running",
                  "point of no return", "never copied"):
        assert label in text, (label, text)
    # the downtime drawn is the one this update measured and printed
    assert f"downtime {downtime_ms(r.stdout)} ms" in text, text
    # every fault point of cpr-transfer is placed, with the rollback it causes
    for fault in ("prepare", "after-stop", "notify", "save", "transfer", "target-restore",
                  "target-crash-after-fds"):
        assert re.search(rf"--fault {fault}\): rolls back", text), (fault, text)


def test_trace_plot_exec_png_and_svg(guests, vmm_procs, tmp_path):
    plot = tmp_path / "exec.svg"
    r = run_exec(vmm_procs, tmp_path, "--trace-plot", str(plot))
    text = svg_texts(plot)
    for label in ("execve", "prebuilder", "holder", "joined: its VM adopted",
                  "Python runs its first line", "--fault exec): rolls back"):
        assert label in text, (label, text)
    assert f"downtime {downtime_ms(r.stdout)} ms" in text, text
    again = tmp_path / "png"
    again.mkdir()
    png = tmp_path / "exec.png"
    run_exec(vmm_procs, again, "--trace-plot", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trace_plot_of_a_rollback(guests, vmm_procs, tmp_path):
    old, old_qmp = start_ticker(vmm_procs, tmp_path)
    new, sock, _ = start_incoming(vmm_procs, tmp_path)
    old.wait_for(r"tick 3 ")
    plot = tmp_path / "rollback.svg"
    r = run_pyvmm("cpr", "--mode", "transfer", "--socket", str(old_qmp), "--uri", str(sock),
                  "--fault", "target-restore", "--trace-plot", str(plot))
    assert r.returncode == 1, r.stderr
    assert "the guest goes on in the old pyvmm" in r.stderr
    text = svg_texts(plot)
    assert "failed and rolled back" in text and "target-restore" in text, text
    assert re.search(r"guest stopped \d+\.\d\d ms, then resumed in the old pyvmm", text), text


def test_trace_plot_bad_file_refused_before_the_update(guests, vmm_procs, tmp_path):
    old, qmp_path = start_ticker(vmm_procs, tmp_path)
    old.wait_for(r"tick 2 ")
    r = run_pyvmm("cpr", "--mode", "exec", "--socket", str(qmp_path), "--trace-plot",
                  str(tmp_path / "plot.pdf"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"pyvmm: error: --trace-plot {tmp_path / 'plot.pdf'}: give a file name ending in "
        ".svg or .png"]
    # nothing happened to the guest: same process, never stopped
    from vmm.client import QmpClient
    with QmpClient(str(qmp_path)) as c:
        assert c.execute("query-status")["status"] == "running"
        assert c.execute("query-migrate") == {}


def test_trace_of_an_early_start(guests, vmm_procs, tmp_path):
    """`pyvmm cpr --mode transfer --early-start --trace --trace-plot`: the handoff
    thread's step, marked concurrent, is where the guest runs again (resume), right
    after the old VMM handed the state over and before the blob reaches the new VMM's
    Python; the plot gives the thread its own lane."""
    plot = tmp_path / "early.svg"
    r = run_transfer(vmm_procs, tmp_path, "--early-start", "--trace", "--trace-plot", str(plot))
    lines = trace_lines(r.stdout)
    assert [t for t, _ in lines] == sorted(t for t, _ in lines), r.stdout
    assert_before(lines, "stop", "save", "old: vCPU and VM state read",
                  "old: VM and vCPU state handed over", "restore", "resume",
                  "handoff: VM and vCPU state written, the guest runs",
                  "new: state blob loaded", "new: device state written",
                  "new: restore done, the early start's claim made final",
                  "new: early vCPU threads stopped", "new: Python's vCPU threads run the guest")
    assert re.search(r"‖ handoff: VM and vCPU state written, the guest runs", r.stdout), r.stdout
    assert "(‖: the handoff thread (--early-start)" in r.stdout
    text = svg_texts(plot)
    assert "handoff thread (C)" in text, text
    assert f"downtime {downtime_ms(r.stdout)} ms" in text, text


def test_early_start_is_for_transfer_only(vmm_procs, tmp_path):
    r = run_pyvmm("cpr", "--mode", "exec", "--socket", str(tmp_path / "none.qmp"),
                  "--early-start")
    assert r.returncode == 1
    assert r.stderr.strip() == ("pyvmm: error: --early-start is for --mode transfer (a cpr-exec's new "
                                "image always starts the guest early)"), r.stderr
