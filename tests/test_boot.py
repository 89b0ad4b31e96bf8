"""Foundation: real guests on real KVM — boot, serial, exit codes, faults, pause/resume, state."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from conftest import need_kvm, run_pyvmm
from vmm import state as state_format
from vmm.machine import Machine, MachineConfig
from vmm.memory import GuestMemory

pytestmark = pytest.mark.usefixtures("kvm")


@pytest.fixture(scope="module")
def kvm():
    need_kvm()


class Console:
    """Serial output collected in memory, with waiting on a pattern."""

    def __init__(self):
        self.data = bytearray()
        self.cond = threading.Condition()

    def write(self, b: bytes) -> None:
        with self.cond:
            self.data += b
            self.cond.notify_all()

    def text(self) -> str:
        with self.cond:
            return self.data.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 20.0, after: int = 0) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                m = rx.search(self.data.decode(errors="replace"), after)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {pattern!r} in console output:\n{self.text()[-2000:]}")
                self.cond.wait(left)


def ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"tick (\d+) ", text)]


def boot(guests, name, cmdline="", memory=64 << 20):
    console = Console()
    m = Machine(MachineConfig(kernel=str(guests / f"{name}.elf"), memory=memory,
                              cmdline=cmdline, console=console.write))
    m.create()
    m.boot()
    m.start()
    return m, console


# -- the CLI, as a user runs it --------------------------------------------------------------
def test_hello_prints_and_exits_zero(guests):
    r = run_pyvmm("run", "--kernel", str(guests / "hello.elf"), "--cmdline", "greeting=yes")
    assert r.returncode == 0, r.stderr
    assert "Hello" in r.stdout
    assert "cmdline: greeting=yes" in r.stdout
    assert "ring3: ok" in r.stdout


def test_guest_exit_code_becomes_pyvmm_status(guests):
    r = run_pyvmm("run", "--kernel", str(guests / "ticker.elf"), "--cmdline",
                  "period_us=10000 count=3")
    assert r.returncode == 0, r.stderr
    assert ticks(r.stdout) == [1, 2, 3]


@pytest.mark.parametrize("fault,vector", [("ud", "#UD"), ("pf", "#PF"), ("gp", "#GP"),
                                          ("de", "#DE")])
def test_guest_fault_is_reported(guests, fault, vector):
    r = run_pyvmm("run", "--kernel", str(guests / "hello.elf"), "--cmdline", f"fault={fault}")
    assert r.returncode == 3
    assert f"FAULT: {vector}" in r.stdout


def test_triple_fault_stops_vm_with_register_dump(guests):
    r = run_pyvmm("run", "--kernel", str(guests / "hello.elf"), "--cmdline", "fault=triple")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("pyvmm: error: the guest triple-faulted")
    assert any("rip=0x" in line for line in lines[1:])
    assert any("cr3=" in line for line in lines[1:])
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--kernel", "/nonexistent/kernel.elf"], "not found"),
    (["--kernel", __file__], "not an ELF"),
    (["--kernel", "/bin/true"], "no PVH entry point"),
    (["--kernel", "KERNEL", "--memory", "100T"], "larger than this host"),
    (["--kernel", "KERNEL", "--memory", "lots"], "cannot read memory size"),
    (["--kernel", "KERNEL", "--memory", "1K"], "too small"),
    (["--kernel", "KERNEL", "--net", "user"], "only tap networking"),
    ([], "--kernel"),
])
def test_bad_input_is_one_clear_line(guests, args, message):
    args = [str(guests / "hello.elf") if a == "KERNEL" else a for a in args]
    r = run_pyvmm("run", *args)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("pyvmm: error:")
    assert message in r.stderr


def test_missing_kvm_is_a_clear_error(guests, tmp_path):
    from vmm.errors import KvmError
    from vmm.kvm.system import Kvm
    with pytest.raises(KvmError, match="not found: this machine has no KVM"):
        Kvm(str(tmp_path / "kvm"))
    (tmp_path / "kvm").write_text("")
    os.chmod(tmp_path / "kvm", 0)
    if os.geteuid() != 0:
        with pytest.raises(KvmError, match="permission denied"):
            Kvm(str(tmp_path / "kvm"))


def test_a_failed_build_step_is_named_and_leaves_nothing_open():
    """csrc/build_vm.c builds every VM; a step KVM refuses (here a memory slot whose
    host address is not page-aligned) is one line naming the ioctl, as Python's own
    ioctls say it, and the VM it had made is closed again."""
    from vmm.errors import KvmError
    from vmm.kvm.system import Kvm
    from vmm.kvm.vm import build

    class Misaligned:   # a GuestMemory whose mapping KVM must refuse
        def __init__(self, mem):
            self.regions, self.size, self.host_base = mem.regions, mem.size, mem.host_base + 1

    mem = GuestMemory(16 * 1024 * 1024)
    kvm = Kvm()
    try:
        before = sorted(os.listdir("/proc/self/fd"))
        with pytest.raises(KvmError) as e:
            build(kvm, Misaligned(mem), 2)
        assert str(e.value) == "KVM SET_USER_MEMORY_REGION failed: Invalid argument"
        assert sorted(os.listdir("/proc/self/fd")) == before
        vm_fd, vcpu_fds = build(kvm, mem, 2)   # and the same call on good memory works
        assert len(vcpu_fds) == 2
        for fd in vcpu_fds + [vm_fd]:
            os.close(fd)
    finally:
        kvm.close()
        mem.close()


# -- in-process: pause, resume, state --------------------------------------------------------
def test_vcpu_parks_and_reenters_without_the_gil(guests):
    """A vCPU thread parks at its gate and goes back into the guest in C (csrc/vcpu_run.h):
    neither waits for the GIL.  This thread keeps the GIL throughout (switch interval
    1 s, a pure-Python spin that never blocks) while it asks for a pause and watches
    the thread park, then while it releases it and watches it re-enter the guest.  A
    vCPU thread that needed Python for either would wait out the whole spin."""
    import sys
    m, console = boot(guests, "ticker", "period_us=1000000")
    try:
        console.wait_for(r"tick 2 [^\n]*\n")   # (its whole line: each byte is an exit)
        time.sleep(0.1)   # (and the write's last LSR poll: then ring 3 for a second)
        t = m.threads[0]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1.0)
        try:
            t.request_pause()
            deadline = time.monotonic() + 0.3
            while not t.paused and time.monotonic() < deadline:
                pass
            parked = t.paused
            since = t.gate.entered
            t.resume()
            deadline = time.monotonic() + 0.3
            while t.gate.entered == since and time.monotonic() < deadline:
                pass
            reentered = t.gate.entered != since
        finally:
            sys.setswitchinterval(interval)
        assert parked, "the vCPU thread needed the GIL to park"
        assert reentered, "the vCPU thread needed the GIL to go back into the guest"
        console.wait_for(r"tick 4 ", timeout=10)   # and the guest runs on
    finally:
        m.close()


def test_pause_resume_keeps_counter_going(guests):
    m, console = boot(guests, "ticker", "period_us=20000")
    try:
        console.wait_for(r"tick 3 ")
        m.pause()
        assert all(t.paused for t in m.threads)
        frozen = len(console.data)
        time.sleep(0.3)
        assert len(console.data) == frozen, "the guest ran while paused"
        m.resume()
        last = ticks(console.text())[-1]
        console.wait_for(rf"tick {last + 3} ")
        seen = ticks(console.text())
        assert seen == list(range(1, len(seen) + 1))
        # The guest saw the pause as a gap in time: its clock went on meanwhile, so
        # the tick after it came a pause later.  (Not `maxgap_us`: the ticker leaves
        # its tick path out of that, and a pause can land there even in ring 3, e.g.
        # on the `ud2` of its write call, the exception not yet delivered: seen once.)
        t_us = [int(x) for x in re.findall(r"t_us=(\d+)", console.text())]
        assert max(b - a for a, b in zip(t_us, t_us[1:])) >= 250_000
    finally:
        m.close()


def test_state_round_trip_same_vm(guests):
    m, console = boot(guests, "ticker", "period_us=20000")
    try:
        console.wait_for(r"tick 2 ")
        m.pause()
        before = m.save_state()
        blob = state_format.dumps(before)
        again = state_format.loads(blob)
        m.restore_state(again, advance_time=False)
        after = m.save_state()
        for piece in ("regs", "sregs", "lapic", "xcrs", "debugregs", "mp_state"):
            assert after["vcpus"][0][piece] == before["vcpus"][0][piece], piece
        assert after["vm"]["irqchip"] == before["vm"]["irqchip"]
        m.resume()
        last = ticks(console.text())[-1]
        console.wait_for(rf"tick {last + 2} ")
    finally:
        m.close()


def test_state_round_trip_into_fresh_vm_on_same_memfd(guests):
    """The heart of CPR, in one process: a new KVM VM on the same RAM takes over the guest."""
    m, console = boot(guests, "ticker", "period_us=20000")
    try:
        console.wait_for(r"tick 3 ")
        m.pause()
        saved = state_format.loads(state_format.dumps(m.save_state()))
        last = ticks(console.text())[-1]
        ram_fd = os.dup(m.memory.fd)
        size = m.memory.size
        m.stop()
        m.vm.close()
        m.vm = None
        new = Machine(MachineConfig(kernel=None, memory=size, console=console.write))
        new.create(memory=GuestMemory.from_fd(ram_fd, size), cpuids=saved["machine"]["cpuid"],
                   restoring=True)
        new.restore_state(saved)
        new.restore_devices(saved, {})   # (constructs them: serial and debug-exit, no fds)
        new.start()
        console.wait_for(rf"tick {last + 3} ")
        seen = ticks(console.text())
        assert seen == list(range(1, len(seen) + 1)), "counter went back or skipped"
        new.close()
    finally:
        m.close()


def test_state_for_another_ram_size_is_refused(guests):
    """A well-formed blob for another machine shape (RAM size) is refused on restore.
    (Blobs refused before that, corrupt or of another version: test_state_blob.py.)"""
    m, console = boot(guests, "ticker", "period_us=20000")
    try:
        console.wait_for(r"tick 1 ")
        m.pause()
        blob = state_format.dumps(m.save_state())
        m.resume()
    finally:
        m.close()
    state = state_format.loads(blob)
    state["machine"]["memory"]["size"] *= 2
    other = Machine(MachineConfig(kernel=None, memory=64 << 20))
    other.create()
    try:
        with pytest.raises(state_format.StateError, match="RAM"):
            other.restore_state(state)
    finally:
        other.close()


def test_stdin_reaches_the_guest_serial_port(guests, vmm_procs):
    import subprocess
    p = vmm_procs(["run", "--kernel", str(guests / "hello.elf"), "--cmdline", "echo_input=1"],
                  stdin=subprocess.PIPE)
    p.wait_for(r"cmdline: echo_input=1")     # the UART is set up (its FIFO reset) by now
    p.proc.stdin.write(b"typed by a student\n")
    p.proc.stdin.flush()
    p.wait_for(r"^input: typed by a student$")
    assert p.wait(10) == 0


def test_hugetlb_without_huge_pages_is_a_clear_error(guests):
    with open("/proc/sys/vm/nr_hugepages") as f:
        if int(f.read()) > 0:
            pytest.skip("this host has huge pages reserved")
    r = run_pyvmm("run", "--kernel", str(guests / "hello.elf"), "--hugetlb")
    assert r.returncode == 1
    assert r.stderr.startswith("pyvmm: error:") and r.stderr.count("\n") == 1
    assert "huge pages" in r.stderr and "nr_hugepages" in r.stderr


def test_dirty_log_sees_the_guest_write(guests):
    """KVM's dirty log (the tool CPR does not need, and live migration does)."""
    m, console = boot(guests, "pattern", "pattern_mb=8")
    try:
        console.wait_for(r"pass 2")
        m.pause()
        m.vm.set_memory_region(0, 0, m.memory.size, m.memory.host_base,
                               flags=__import__("vmm.kvm.ffi", fromlist=["lib"]).lib.KVM_MEM_LOG_DIRTY_PAGES)
        m.vm.get_dirty_log(0)                  # start clean
        start = len(console.text())            # (the guest may be passes ahead of "pass 2")
        m.resume()
        first = console.wait_for(r"pass \d+", after=start)   # a pass that began before...
        console.wait_for(r"pass \d+", after=first.end())      # ...and a whole one after
        m.pause()
        bitmap = m.vm.get_dirty_log(0)
        dirty = sum(bin(b).count("1") for b in bitmap)
        assert dirty >= 8 * 256 - 8, dirty     # every page of the 8 MiB pattern area
        m.resume()
    finally:
        m.close()


def test_uart_fast_path_writes_the_same_bytes_in_order(guests, tmp_path):
    """With an fd console the UART's LSR polls and THR writes stay in C (no Python, no
    GIL per byte), and where KVM has coalesced PIO the THR writes do not even exit:
    they leave through the ring; the output is byte for byte what the Python model
    writes."""
    from vmm.machine import FdConsole
    outputs = {}
    for fast in (False, True):
        path = tmp_path / f"out-{fast}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        console = FdConsole(fd) if fast else (lambda data, fd=fd: os.write(fd, data))
        m = Machine(MachineConfig(kernel=str(guests / "ticker.elf"), memory=64 << 20,
                                  cmdline="period_us=1000 count=200", console=console))
        try:
            m.create()
            m.boot()
            m.start()
            assert m.wait(30) and m.exit_code == 0
            handled = m.uart_fast.handled if fast else 0
            ring = m.uart_ring
            coalesced = bool(ring and m.uart_fast.ring)
            drained = ring.drained if ring else 0
        finally:
            m.close()
            os.close(fd)
        outputs[fast] = path.read_text()
        if fast and coalesced:   # a poll per 16 bytes in C, every byte through the ring
            assert drained > 200 * 25 and 200 * 2 < handled < 200 * 10, (drained, handled)
        elif fast:
            assert handled > 200 * 35     # an exit per byte (and a poll per 16), ~37 bytes a line
    slow, fast_ = (ticks(outputs[k]) for k in (False, True))
    assert slow == fast_ == list(range(1, 201))
    # The same lines apart from the times the guest printed.
    strip = lambda text: re.sub(r"\d+", "N", text)  # noqa: E731
    assert strip(outputs[False]) == strip(outputs[True])


def test_coalesced_uart_output_stays_in_order_when_the_fast_path_goes_off(guests, tmp_path):
    """THR writes KVM queued in the coalesced ring leave before anything the model does
    once the fast path goes off (here DLAB set and cleared under a printing guest, as a
    driver setting its baud rate would): the zone is unregistered, the ring written
    out, and every line that reached the console is whole and in order."""
    from vmm.devices.serial import LCR
    from vmm.machine import FdConsole
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    m = Machine(MachineConfig(kernel=str(guests / "ticker.elf"), memory=64 << 20,
                              cmdline="period_us=500", console=FdConsole(fd)))
    try:
        m.create()
        m.boot()
        m.start()
        if m.uart_ring is None:
            pytest.skip("KVM has no coalesced PIO here (KVM_CAP_COALESCED_PIO)")
        uart = m.device("serial").uart
        deadline = time.monotonic() + 10
        while m.uart_ring.registered != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert m.uart_ring.registered == 1   # (the vCPU loop registered the THR's zone)
        for _ in range(3):
            time.sleep(0.05)
            uart.write(LCR, bytes([0x83]))   # DLAB: THR writes are divisor writes now
            assert m.uart_ring.registered == 0 and m.uart_fast.enabled == 0
            time.sleep(0.02)
            uart.write(LCR, bytes([0x03]))   # 8N1 again: the loop registers it anew
        time.sleep(0.05)
        drained = m.uart_ring.drained
    finally:
        m.close()
        os.close(fd)
    text = path.read_text()
    assert drained > 0
    lines = [line for line in text.split("\r\n") if line.startswith("tick")]
    # Bytes written while DLAB was set went to the divisor latch, so a line may be cut
    # there; every other line is whole, and the ticks only go forward.
    whole = ticks(text)
    assert whole == sorted(whole) and len(set(whole)) == len(whole), whole
    assert sum(bool(re.fullmatch(r"tick \d+ t_us=\d+ maxgap_us=\d+", x)) for x in lines) \
        >= len(lines) - 6, lines


def test_vcpu_threads_run_ahead_of_the_vmm_threads(guests):
    """vCPU threads at nice -5 (csrc/vcpu_run.h, pyvmm_vcpu_thread_nice): as root here."""
    if os.geteuid() != 0:
        pytest.skip("setting a negative nice needs CAP_SYS_NICE")
    m, console = boot(guests, "ticker", "period_us=20000")
    try:
        console.wait_for(r"tick 1 ")
        nice = {}
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            nice["main" if int(tid) == os.getpid() else comm] = int(
                stat[stat.rindex(")") + 2:].split()[16])
        assert nice["vcpu0"] == -5 and nice["main"] == 0, nice
    finally:
        m.close()


@pytest.mark.parametrize("prealloc", [False, True])
def test_mem_prealloc_allocates_all_ram_before_the_guest_runs(guests, prealloc):
    """--mem-prealloc (QEMU's -mem-prealloc): every page of RAM is allocated before the
    boot; without it only what the guest touched is."""
    m = Machine(MachineConfig(kernel=str(guests / "hello.elf"), memory=64 << 20,
                              prealloc=prealloc, console=lambda b: None))
    try:
        m.create()
        allocated = os.fstat(m.memory.fd).st_blocks * 512
        assert (allocated == 64 << 20) if prealloc else (allocated < 8 << 20), allocated
    finally:
        m.close()


def test_qemus_spelling_mem_prealloc_is_not_taken_for_m(guests):
    """A QEMU user types `-m 64M -mem-prealloc`: that is --mem-prealloc, not `-m em-prealloc`."""
    r = run_pyvmm("run", "--kernel", str(guests / "hello.elf"), "-m", "64M", "-mem-prealloc")
    assert r.returncode == 0 and "ring3: ok" in r.stdout, r.stderr
