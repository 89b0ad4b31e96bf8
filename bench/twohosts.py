"""Two hosts and a client on one machine, for live migration: network namespaces.

    hostA                                 hostB
    mig0 192.168.77.1  <== veth ==>  mig0 192.168.77.2     the migration link (tc here)
    tap0 + uplink in br0                  tap0 + uplink in br0    the guest's tap, bridged
          |                                     |
          +------ upA   client: br0   upB ------+           the switch, 10.0.0.1/24
                        10.0.0.1

Each host namespace has its own tap (`tap0`) for the guest, bridged with a veth
(its "NIC") to the client namespace, whose bridge is the switch of the guest's
L2 segment.  So a guest with 10.0.0.2 talks to the client at 10.0.0.1 whichever
host it runs on; after a move the switch learns the guest's new port from the
first frame it sends (a gratuitous ARP/RARP from `announce-self`, or any
reply).  The hosts have no address on that segment, as a real hypervisor's
bridge would not; they reach each other over the migration link only.

Everything lives in namespaces this module made and removes (on exit, also on a
failure): no traffic leaves them.  pyvmm is not needed; run a VMM inside a host
namespace with `ip netns exec NS ...` (`TwoHosts.run`).

    python -m bench.twohosts up [--name mig] [--rate 1gbit] [--delay 1ms (needs netem)]
    python -m bench.twohosts status [--name mig]
    python -m bench.twohosts down [--name mig]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

from bench.lab import GUEST_IP, HOST_IP, in_ns, sh

CLIENT_IP = HOST_IP          # the client's address on the guest's segment
LINK_NET = "192.168.77"      # the migration link: .1 in hostA, .2 in hostB
LINK_DEV = "mig0"            # the migration link's name in both host namespaces
TAP = "tap0"                 # the guest's tap in both host namespaces
BRIDGE = "br0"               # the bridge in each host namespace and the switch in the client's
UPLINK = "uplink"            # a host's veth to the switch
SCRIPT_NAME = "mig"          # the prefix `python -m bench.twohosts` uses
_counter = itertools.count()


@dataclass(frozen=True)
class TwoHosts:
    """The namespaces of one topology, named `PREFIX-hostA`, `PREFIX-hostB`, `PREFIX-client`."""

    prefix: str

    @property
    def host_a(self) -> str:
        return f"{self.prefix}-hostA"

    @property
    def host_b(self) -> str:
        return f"{self.prefix}-hostB"

    @property
    def client(self) -> str:
        return f"{self.prefix}-client"

    @property
    def hosts(self) -> tuple[str, str]:
        return self.host_a, self.host_b

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return self.host_a, self.host_b, self.client

    tap = TAP
    client_ip = CLIENT_IP
    guest_ip = GUEST_IP

    def link_ip(self, host: str) -> str:
        """The migration link's address of a host namespace (hostA .1, hostB .2)."""
        return f"{LINK_NET}.{1 + self.hosts.index(host)}"

    def other(self, host: str) -> str:
        return self.host_b if host == self.host_a else self.host_a

    def switch_port(self, host: str) -> str:
        """The client bridge's port that leads to `host` (upA, upB)."""
        return "up" + host[-1]

    def run(self, ns: str, *cmd: str) -> list[str]:
        """The command line that runs `cmd` inside namespace `ns` (bench.lab.in_ns)."""
        return in_ns(ns, *cmd)

    def sh(self, ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh(*self.run(ns, *cmd), check=check)

    def set_link(self, rate: str | None = None, delay: str | None = None) -> None:
        """Shape the migration link both ways (rate in tc's units, like "1gbit"; delay like
        "1ms"), or take the shaping off when both are None.  A rate alone is a token bucket
        (`tbf`); a delay needs `netem`, which not every kernel has (CONFIG_NET_SCH_NETEM)."""
        for host in self.hosts:
            self.sh(host, "tc", "qdisc", "del", "dev", LINK_DEV, "root", check=False)
            if delay:
                args = ["netem", "limit", "100000", "delay", delay] + (["rate", rate] if rate
                                                                      else [])
            elif rate:
                # burst: 2 ms at the rate, and at least two 64 KiB GSO frames of the veth
                burst = max(131072, rate_bits(rate) // 8 // 500)
                args = ["tbf", "rate", rate, "burst", str(burst), "latency", "100ms"]
            else:
                continue
            r = self.sh(host, "tc", "qdisc", "add", "dev", LINK_DEV, "root", *args, check=False)
            if r.returncode:
                hint = (" (this kernel has no netem: shape the rate only)"
                        if delay and "unknown" in r.stderr else "")
                raise RuntimeError(f"tc {' '.join(args)}: {r.stderr.strip()}{hint}")

    def link_shaping(self) -> str:
        """hostA's qdisc on the migration link, as `tc` prints it ("" when unshaped)."""
        out = self.sh(self.host_a, "tc", "qdisc", "show", "dev", LINK_DEV).stdout
        return next((line.strip() for line in out.splitlines()
                     if "netem" in line or "tbf" in line), "")

    def port_of(self, mac: str) -> str | None:
        """The host whose uplink the switch has learned `mac` on, or None."""
        return self.guests_seen().get(mac.lower())

    def guests_seen(self) -> dict[str, str]:
        """{MAC: host} the switch (the client's bridge) has learned behind a host's uplink,
        leaving out the topology's own interfaces (the host bridges' frames)."""
        own = set()
        for ns in self.namespaces:
            for line in self.sh(ns, "ip", "-br", "link").stdout.splitlines():
                f = line.split()
                if len(f) > 2:
                    own.add(f[2].lower())
        seen = {}
        out = self.sh(self.client, "bridge", "fdb", "show", "br", BRIDGE).stdout
        for line in out.splitlines():
            f = line.split()
            if not f or "permanent" in f or "dev" not in f or f[0].lower() in own:
                continue
            port = f[f.index("dev") + 1]
            for host in self.hosts:
                if port == self.switch_port(host):
                    seen[f[0].lower()] = host
        return seen

    def socket_copy(self, nbytes: int, port: int = 4445, src: str | None = None) -> dict:
        """Copy `nbytes` over the migration link with a plain TCP socket (bench.sockcopy),
        from `src` (hostA by default) to the other host; the receiver's JSON figures."""
        src = src or self.host_a
        dst = self.other(src)
        recv = subprocess.Popen(self.run(dst, sys.executable, "-m", "bench.sockcopy", "recv",
                                         str(port)), stdout=subprocess.PIPE, text=True)
        try:
            if recv.stdout.readline().strip() != "listening":
                raise RuntimeError("bench.sockcopy's receiver did not start")
            subprocess.run(self.run(src, sys.executable, "-m", "bench.sockcopy", "send",
                                    self.link_ip(dst), str(port), str(nbytes)),
                           check=True, timeout=600)
            return json.loads(recv.communicate(timeout=60)[0])
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait()

    def exists(self) -> bool:
        return all(ns in list_namespaces() for ns in self.namespaces)

    def status(self) -> str:
        """What `python -m bench.twohosts status` prints: each namespace's links and addresses,
        the link's shaping and what the switch has learned."""
        out = []
        for ns in self.namespaces:
            if ns not in list_namespaces():
                out.append(f"{ns}: missing")
                continue
            out.append(f"{ns}:")
            brief = self.sh(ns, "ip", "-br", "addr", "show").stdout
            out += ["  " + line for line in brief.splitlines() if not line.startswith("lo ")]
        if self.exists():
            out.append(f"migration link: {self.link_ip(self.host_a)} <-> "
                       f"{self.link_ip(self.host_b)}, {self.link_shaping() or 'unshaped'}")
            guests = [f"{mac} on {self.switch_port(host)} ({host})"
                      for mac, host in self.guests_seen().items()]
            out.append("guests the switch has seen: " + (", ".join(guests) or "none yet"))
        return "\n".join(out)


def rate_bits(rate: str) -> int:
    """bits/s of a tc rate ("1gbit", "100mbit", "500kbit", "1000000bit")."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.strip().lower())
    if not m:
        raise RuntimeError(f"rate {rate!r}: write it in tc's bit units, like 1gbit or 100mbit")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)])


def list_namespaces() -> list[str]:
    return [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines()
            if line.strip()]


def up(prefix: str, rate: str | None = None, delay: str | None = None) -> TwoHosts:
    """Make the topology (the namespaces must not exist yet); on a failure remove what was
    made and raise."""
    t = TwoHosts(prefix)
    taken = [ns for ns in t.namespaces if ns in list_namespaces()]
    if taken:
        raise RuntimeError(f"namespace {taken[0]} exists already: remove it with "
                           f"`python -m bench.twohosts down --name {prefix}`")
    try:
        _build(t)
        if rate or delay:
            t.set_link(rate, delay)
    except BaseException:
        down(t)
        raise
    return t


def _build(t: TwoHosts) -> None:
    for ns in t.namespaces:
        sh("ip", "netns", "add", ns)
        t.sh(ns, "ip", "link", "set", "lo", "up")
        # no IPv6 chatter (router solicitations, DAD) on the links a benchmark measures
        t.sh(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        t.sh(ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
    t.sh(t.client, "ip", "link", "add", BRIDGE, "type", "bridge")
    t.sh(t.client, "ip", "addr", "add", f"{CLIENT_IP}/24", "dev", BRIDGE)
    t.sh(t.client, "ip", "link", "set", BRIDGE, "up")
    t.sh(t.host_a, "ip", "link", "add", LINK_DEV, "type", "veth", "peer", "name", LINK_DEV,
         "netns", t.host_b)
    for host in t.hosts:
        t.sh(host, "ip", "addr", "add", f"{t.link_ip(host)}/24", "dev", LINK_DEV)
        t.sh(host, "ip", "link", "set", LINK_DEV, "up")
        t.sh(host, "ip", "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr")
        t.sh(host, "ip", "link", "add", BRIDGE, "type", "bridge")
        port = t.switch_port(host)
        t.sh(host, "ip", "link", "add", UPLINK, "type", "veth", "peer", "name", port,
             "netns", t.client)
        for dev in (TAP, UPLINK):
            t.sh(host, "ip", "link", "set", dev, "master", BRIDGE)
            t.sh(host, "ip", "link", "set", dev, "up")
        t.sh(host, "ip", "link", "set", BRIDGE, "up")
        t.sh(t.client, "ip", "link", "set", port, "master", BRIDGE)
        t.sh(t.client, "ip", "link", "set", port, "up")
    deadline = time.monotonic() + 5         # veths report UP a moment after `set up`
    while time.monotonic() < deadline and any(
            "state UP" not in t.sh(h, "ip", "link", "show", LINK_DEV).stdout for h in t.hosts):
        time.sleep(0.02)


def down(t: TwoHosts) -> None:
    """Kill every process left in the namespaces, then remove them (and with them every
    link, tap, bridge and qdisc made here).  Never fails."""
    for ns in t.namespaces:
        for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    for ns in t.namespaces:
        sh("ip", "netns", "del", ns, check=False)


@contextmanager
def two_hosts(rate: str | None = None, delay: str | None = None, prefix: str | None = None):
    """Yield a fresh TwoHosts (unique names per run unless `prefix`); removed on exit."""
    t = up(prefix or f"pyvmm-{os.getpid()}-{next(_counter)}", rate, delay)
    try:
        yield t
    finally:
        down(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.twohosts",
                                 description="Two hosts and a client in network namespaces, "
                                             "for live migration by hand (root).")
    ap.add_argument("action", choices=["up", "down", "status"])
    ap.add_argument("--name", default=SCRIPT_NAME,
                    help="namespace prefix: NAME-hostA, NAME-hostB, NAME-client (default mig)")
    ap.add_argument("--rate", help="rate limit on the migration link both ways, e.g. 1gbit (up only)")
    ap.add_argument("--delay", help="delay on the migration link both ways, e.g. 1ms (needs the kernel's netem; up only)")
    a = ap.parse_args(argv)
    t = TwoHosts(a.name)
    try:
        if a.action == "up":
            up(a.name, a.rate, a.delay)
            print(t.status())
        elif a.action == "down":
            down(t)
            print(f"removed {', '.join(t.namespaces)}")
        else:
            print(t.status())
            return 0 if t.exists() else 1
    except (RuntimeError, subprocess.CalledProcessError) as e:
        msg = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
        print(f"twohosts: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
