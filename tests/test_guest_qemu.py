"""Boot the toy guests (guest/) under QEMU microvm with KVM: the reference host for the guest ABI.

QEMU's isa-debug-exit turns the guest's outl(code, 0xf4) into exit status (code << 1) | 1.
"""

import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUEST = ROOT / "guest"
BUILD = GUEST / "build"
QEMU = shutil.which("qemu-system-x86_64")

pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="/dev/kvm is not usable"),
    pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None,
                       reason="gcc/make needed to build the guests"),
]

# -cpu host fails on some hosts (PVM rejects MSR 0x10a); qemu64+invtsc also exposes
# CPUID 0x40000010 (TSC kHz). The virtio-mmio transports must be "modern" (version 2).
BASE = [
    "-M", "microvm,x-option-roms=off,rtc=off", "-accel", "kvm", "-cpu", "qemu64,+invtsc",
    "-m", "256M", "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
    "-monitor", "none", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
]
# microvm puts the first -device virtio-*-device on its last transport (24 x 512 B at 0xfeb00000)
VIRTIO_NET = ["-global", "virtio-mmio.force-legacy=false"]
VIRTIO_CMDLINE = "virtio_mmio.device=512@0xfeb02e00:28"


def qexit(code):
    return (code << 1) | 1


@pytest.fixture(scope="module", autouse=True)
def guests():
    subprocess.run(["make", "-s", "-C", str(GUEST)], check=True, timeout=120)
    for g in ("hello", "ticker", "pattern", "netecho"):
        assert (BUILD / f"{g}.elf").exists()


def boot(guest, append="", timeout=30, extra=()):
    cmd = [QEMU, *BASE, *extra, "-kernel", str(BUILD / f"{guest}.elf"), "-append", append]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    return p.returncode, p.stdout.decode(errors="replace").replace("\r\n", "\n")


def test_hello():
    rc, out = boot("hello", "foo=bar baz")
    assert "Hello" in out, out
    assert "cmdline: foo=bar baz" in out
    assert "ring3: ok" in out
    assert re.search(r"^tsc: \d+ kHz \((cmdline|cpuid|pit|default)\)$", out, re.M), out
    assert rc == qexit(0), out


def test_hello_tsc_khz_cmdline():
    rc, out = boot("hello", "tsc_khz=1234567")
    assert "tsc: 1234567 kHz (cmdline)" in out
    assert rc == qexit(0)


@pytest.mark.parametrize("mode,vector,ring", [("ud", 6, 0), ("pf", 14, 3), ("gp", 13, 3), ("de", 0, 3)])
def test_fault(mode, vector, ring):
    rc, out = boot("hello", f"fault={mode}")
    m = re.search(r"^FAULT: #(\w+) \(vector (\d+)\) err=0x[0-9a-f]+ rip=0x[0-9a-f]+ "
                  r"cr2=0x([0-9a-f]+) ring=(\d)$", out, re.M)
    assert m, out
    assert int(m.group(2)) == vector and int(m.group(4)) == ring
    if mode == "pf":
        assert int(m.group(3), 16) == 0x4000000000
    assert rc == qexit(3), out


def test_triple_fault():
    # -no-reboot: the shutdown ends QEMU with status 0, without a FAULT line
    rc, out = boot("hello", "fault=triple")
    assert "Hello" in out and "FAULT" not in out
    assert rc == 0


def test_ticker():
    rc, out = boot("ticker", "count=5 period_us=50000")
    ticks = re.findall(r"^tick (\d+) t_us=(\d+) maxgap_us=(\d+)$", out, re.M)
    assert [int(t[0]) for t in ticks] == [1, 2, 3, 4, 5], out
    ts = [int(t[1]) for t in ticks]
    # tick n is due n periods after the loop started (a late tick does not move the
    # next one: the span from the first tick alone shrinks by the first one's lateness)
    assert ts == sorted(ts) and all(t >= n * 50000 for n, t in enumerate(ts, 1)), ts
    assert rc == qexit(0)


def test_pattern():
    rc, out = boot("pattern", "passes=2 pattern_mb=32")
    m = re.search(r"^pattern: progress=0x([0-9a-f]+) pages=(\d+) ranges=(\d+)", out, re.M)
    assert m, out
    assert int(m.group(2)) == 32 * 256 - 1      # first page of the area is the progress page
    assert re.findall(r"^pass (\d+)$", out, re.M) == ["1", "2"]
    assert rc == qexit(0)


# ---------------- netecho over a tap in a private netns ----------------

def _sh(*args, check=True):
    return subprocess.run(list(args), check=check, capture_output=True, timeout=30)


@pytest.fixture
def netns_tap():
    if os.geteuid() != 0:
        pytest.skip("netns/tap need root")
    if shutil.which("ip") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs iproute2 and /dev/net/tun")
    ns = f"pyvmm-guest-{uuid.uuid4().hex[:8]}"
    tap = f"pvg{uuid.uuid4().hex[:8]}"
    _sh("ip", "netns", "add", ns)
    try:
        ex = ["ip", "netns", "exec", ns]
        _sh(*ex, "ip", "link", "set", "lo", "up")
        _sh(*ex, "ip", "tuntap", "add", "dev", tap, "mode", "tap")
        _sh(*ex, "ip", "addr", "add", "10.0.0.1/24", "dev", tap)
        _sh(*ex, "ip", "link", "set", tap, "up")
        yield ns, tap
    finally:
        _sh("ip", "netns", "del", ns, check=False)   # takes the tap with it


def _start_netecho(ns, tap, tmp_path, append):
    log = tmp_path / "serial.log"
    cmd = ["ip", "netns", "exec", ns, QEMU, *BASE, *VIRTIO_NET,
           "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
           "-device", "virtio-net-device,netdev=n0",
           "-kernel", str(BUILD / "netecho.elf"), "-append", f"{VIRTIO_CMDLINE} {append}"]
    f = open(log, "wb")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    f.close()
    return proc, log


def _wait_for(log, pattern, proc, timeout=20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = log.read_text(errors="replace")
        text = text[:text.rfind("\n") + 1]   # whole lines only: QEMU writes byte by byte
        m = re.search(pattern, text, re.M)
        if m:
            return m, text
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    pytest.fail(f"no {pattern!r} in serial output:\n{log.read_text(errors='replace')}")


def _stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


UDP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.bind(("10.0.0.1", 0))
for i in range(5):
    msg = b"pyvmm-echo-%d-" % i + bytes(range(256)) * 3
    s.sendto(msg, ("10.0.0.2", 7))
    data, addr = s.recvfrom(4096)
    assert data == msg and addr == ("10.0.0.2", 7), (data[:32], addr)
print("udp ok")
"""


def test_netecho_ping_udp(netns_tap, tmp_path):
    ns, tap = netns_tap
    proc, log = _start_netecho(ns, tap, tmp_path, "ip=10.0.0.2")
    try:
        m, _ = _wait_for(log, r"^netecho: up ip=10\.0\.0\.2 mac=([0-9a-f:]{17}) features=0x([0-9a-f]+)", proc)
        assert int(m.group(2), 16) & (1 << 32)          # VERSION_1
        ping = _sh("ip", "netns", "exec", ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.0.2",
                   check=False)
        assert ping.returncode == 0, ping.stdout.decode() + log.read_text()
        udp = _sh("ip", "netns", "exec", ns, "python3", "-c", UDP_CLIENT, check=False)
        assert udp.returncode == 0 and b"udp ok" in udp.stdout, udp.stderr.decode() + log.read_text()
        _wait_for(log, r"^netecho: rx=\d+ tx=([1-9]\d*)", proc, timeout=5)
    finally:
        _stop(proc)


@pytest.mark.parametrize("bad", ["loop", "zero", "long"])
def test_netecho_bad_chain_needs_reset(netns_tap, tmp_path, bad):
    ns, tap = netns_tap
    proc, log = _start_netecho(ns, tap, tmp_path, f"bad={bad} stats=0")
    try:
        m, _ = _wait_for(log, rf"^netecho: bad={bad} status=0x([0-9a-f]+)$", proc)
        assert int(m.group(1), 16) & 0x40        # DEVICE_NEEDS_RESET
        assert proc.poll() is None               # the guest keeps running
    finally:
        _stop(proc)


def _hmp(sock_path, *commands, timeout=10):
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    end = time.monotonic() + timeout
    while True:
        try:
            s.connect(str(sock_path))
            break
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)

    def until_prompt():
        buf = b""
        while not buf.endswith(b"(qemu) "):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        return buf

    until_prompt()
    for c in commands:
        s.sendall(c.encode() + b"\n")
        until_prompt()
    s.close()


def test_pattern_memory_layout(tmp_path):
    """Stop the pattern guest mid-run and check the memory against the progress page."""
    import struct
    mon = tmp_path / "mon.sock"
    log = tmp_path / "serial.log"
    dump = tmp_path / "mem.bin"
    base = [a if a != "none" or BASE[i - 1] != "-monitor" else f"unix:{mon},server=on,wait=off"
            for i, a in enumerate(BASE)]
    cmd = [QEMU, *base, "-kernel", str(BUILD / "pattern.elf"), "-append", "pattern_mb=8"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    try:
        m, _ = _wait_for(log, r"^pattern: progress=0x([0-9a-f]+) pages=(\d+)", proc)
        _wait_for(log, r"^pass 3$", proc)
        prog_addr = int(m.group(1), 16)
        top = prog_addr + (8 << 20)
        _hmp(mon, "stop", f'pmemsave 0 {top:#x} "{dump}"')
        mem = dump.read_bytes()
    finally:
        _stop(proc)
    magic, k, addr, npages, nranges = struct.unpack_from("<5Q", mem, prog_addr)
    assert magic == 0x5041545445524E21
    assert k >= 3 and nranges == 1 and npages == 8 * 256 - 1
    start, end = struct.unpack_from("<2Q", mem, prog_addr + 40)
    assert start == prog_addr + 4096 and end == prog_addr + (8 << 20)
    vals = [mem[a] for a in range(start, end, 4096)]
    cur, prev = k % 256, (k - 1) % 256
    assert set(vals) <= {cur, prev}, set(vals)
    # pages below the one being written hold k, pages above hold k - 1
    i = (addr - start) // 4096
    assert all(v == cur for v in vals[:i]) and all(v == prev for v in vals[i + 1:])
