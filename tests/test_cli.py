"""The CLI as users expect it: one-line usage errors with exit status 1 (2 is a
guest crash), --version, help for every option, no empty console file after a
start-up error."""

from __future__ import annotations

import subprocess

import pytest

from conftest import ROOT, need_kvm, pyvmm_cmd, run_pyvmm


def one_line_error(r, code=1):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.parametrize("args", [
    ("run", "--bogus"),
    ("frobnicate",),
    ("cpr", "--mode", "exec"),                                   # --socket missing
    ("cpr", "--mode", "exec", "--socket", "/nonexistent", "--timeout", "-1"),
    ("cpr", "--mode", "exec", "--socket", "/nonexistent", "--timeout", "soon"),
    ("cpr", "--mode", "sideways", "--socket", "/nonexistent"),
])
def test_usage_errors_are_one_line_and_exit_1(args):
    line = one_line_error(run_pyvmm(*args))
    assert line.startswith("pyvmm"), line


def test_version_names_the_release_and_commit():
    r = run_pyvmm("--version")
    assert r.returncode == 0, r.stderr
    from vmm import __version__
    assert r.stdout.startswith(f"pyvmm {__version__}"), r.stdout
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    if head:
        assert head in r.stdout, r.stdout


def test_help_explains_every_option():
    run_help = run_pyvmm("run", "--help").stdout
    assert "exit status" in run_help and "guest crashes" in run_help, run_help
    assert "backend=" in run_help and "bare `tap`" in run_help.replace("\n", " "), run_help
    cpr_help = " ".join(run_pyvmm("cpr", "--help").stdout.split())
    from vmm.cpr.faults import POINTS
    for name in POINTS:
        assert name in cpr_help.replace("- ", "-"), (name, cpr_help)
    assert "default 60 s" in cpr_help, cpr_help
    assert "same PID" in cpr_help, cpr_help
    state_help = run_pyvmm("state", "--help").stdout
    assert "QMP socket" in state_help, state_help


def test_bench_rejects_a_bad_size():
    line = one_line_error(run_pyvmm("bench", "downtime", "--sizes", "3X"))
    assert "3X" in line, line
    line = one_line_error(run_pyvmm("bench", "downtime", "--modes", "sideways"))
    assert "sideways" in line, line


def test_start_up_error_leaves_no_empty_console_file(tmp_path):
    console = tmp_path / "serial.log"
    line = one_line_error(run_pyvmm("run", "--kernel", str(tmp_path / "missing.elf"),
                                    "--console", str(console)))
    assert "missing.elf" in line, line
    assert not console.exists()
    # A console file that was there before stays, contents and all.
    console.write_text("earlier run\n")
    one_line_error(run_pyvmm("run", "--kernel", str(tmp_path / "missing.elf"),
                             "--console", str(console)))
    assert console.read_text() == "earlier run\n"


def test_client_commands_wait_for_a_vmm_that_is_starting(guests, vmm_procs, tmp_path):
    """`pyvmm state` typed right after `pyvmm run ... &` (as in the labs) waits for the
    monitor socket to appear instead of failing; so does `pyvmm cpr --mode transfer`
    for a new pyvmm that does not listen yet."""
    import time
    qmp_path = tmp_path / "vm.qmp"
    need_kvm()
    state = subprocess.Popen(pyvmm_cmd("state", "--socket", str(qmp_path)), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert state.poll() is None, state.communicate()
    vmm_procs(["run", "--kernel", str(guests / "ticker.elf"), "--qmp", str(qmp_path)])
    out, err = state.communicate(timeout=30)
    assert state.returncode == 0, err
    assert '"vcpus"' in out

    uri = tmp_path / "cpr.sock"
    cpr = subprocess.Popen(pyvmm_cmd("cpr", "--mode", "transfer", "--socket", str(qmp_path),
                                     "--uri", str(uri)), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert cpr.poll() is None, cpr.communicate()
    vmm_procs(["run", "--incoming", f"cpr-transfer:{uri}"])
    out, err = cpr.communicate(timeout=60)
    assert cpr.returncode == 0, err
    assert "live update (cpr-transfer) completed" in out


def test_bench_migrate_is_the_issue_s_name_for_the_migration_bench():
    r = run_pyvmm("bench", "migrate", "--help")
    assert r.returncode == 0, r.stderr
    assert "live migration between two hosts" in " ".join(r.stdout.split())
