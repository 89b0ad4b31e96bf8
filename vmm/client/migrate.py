"""`pyvmm migrate`: move a running guest to another host, driven over QMP.

It speaks QEMU's QMP only (migrate-set-parameters, migrate, query-migrate,
migrate_cancel), so it drives pyvmm and QEMU alike: the destination was started
with `--incoming tcp:HOST:PORT` (`-incoming` for QEMU) and waits there.  While the
precopy passes run it shows their progress (a rich bar on a terminal, a plain
line per pass otherwise); at the end a summary of QEMU's own figures.
"""

from __future__ import annotations

import sys

from ..errors import VmmError
from ..memory import parse_size
from .cpr import wait_migration
from .qmp import START_WAIT_S, QmpClient, QmpError

POLL_S = 0.1


def parse_rate(text: str) -> int:
    """Bytes/s from a rate written like QEMU's HMP `max-bandwidth`: 100M, 1G (K/M/G are
    powers of 1024; a bare number is MiB/s)."""
    try:
        return parse_size(text)
    except VmmError:
        raise VmmError(f"cannot read rate {text!r}: bytes per second with K, M or G, "
                       "e.g. 100M or 1G") from None


def check_uri(uri: str) -> None:
    parts = uri.split(":")
    if len(parts) != 3 or parts[0] != "tcp" or not parts[2].isdigit():
        raise VmmError(f"--to {uri!r}: write tcp:HOST:PORT, the address the destination was "
                       "started with (pyvmm run --incoming tcp:HOST:PORT)")


def cmd_migrate(args) -> int:
    check_uri(args.to)
    params = {}
    if args.downtime_limit is not None:
        params["downtime-limit"] = args.downtime_limit
    if args.max_bandwidth is not None:
        params["max-bandwidth"] = parse_rate(args.max_bandwidth)
    live = sys.stdout.isatty() and not args.no_live
    client = QmpClient(args.socket, timeout=10.0, wait=START_WAIT_S)
    started = False
    try:
        if params:
            client.execute("migrate-set-parameters", arguments=params)
        client.execute("migrate", uri=args.to)
        started = True
        with Progress(live) as progress:
            def query():
                info = client.execute("query-migrate")
                progress.show(info)
                return info
            info = wait_migration(query, args.timeout, gone=(), poll=POLL_S)
    except QmpError as e:
        raise VmmError(f"the VMM refused: {e}") from None
    except KeyboardInterrupt:
        if started:
            try:
                client.execute("migrate_cancel")
                print("pyvmm: interrupted: migrate_cancel sent; the guest goes on in the source",
                      file=sys.stderr)
            except (QmpError, OSError):
                print("pyvmm: interrupted; the migration may go on: see query-migrate",
                      file=sys.stderr)
        raise
    finally:
        client.close()
    if info["status"] != "completed":
        print(f"pyvmm: migration {info['status']}: "
              f"{info.get('error-desc', 'no reason given')}; the guest goes on in the source",
              file=sys.stderr)
        return 1
    print_summary(info, live)
    return 0


def _mib(n) -> str:
    return f"{(n or 0) / (1 << 20):.1f} MiB"


def figures(info: dict) -> dict:
    """The progress figures of one query-migrate answer (QEMU's `ram` dict)."""
    ram = info.get("ram") or {}
    page = ram.get("page-size") or 4096
    return {"pass": ram.get("dirty-sync-count", 0),
            "total": ram.get("total", 0),
            "remaining": ram.get("remaining", 0),
            "dirty_MBps": (ram.get("dirty-pages-rate") or 0) * page / 1e6,
            "mbps": ram.get("mbps") or 0.0}


class Progress:
    """The live view: a rich progress bar (pass, share of RAM sent in it, remaining, dirty
    rate, throughput) on a terminal, or one plain line per pass."""

    def __init__(self, live: bool):
        self.live = live
        self.bar = None
        self.last_pass = None

    def __enter__(self):
        if self.live:
            try:
                from rich.progress import BarColumn, Progress as Bar, TextColumn
            except ImportError:   # rich is the `bench` extra: plain lines without it
                self.live = False
                return self
            self.bar = Bar(TextColumn("pass {task.fields[pass]}"), BarColumn(),
                           TextColumn("{task.percentage:>3.0f}%"),
                           TextColumn("remaining {task.fields[remaining]}"),
                           TextColumn("dirty {task.fields[dirty]:>8}"),
                           TextColumn("{task.fields[mbps]:>12}"), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("migrate", total=1, remaining="",
                                          dirty="", mbps="", **{"pass": "-"})
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def show(self, info: dict) -> None:
        if info.get("status") not in ("active", "device", "pre-switchover"):
            return
        f = figures(info)
        if self.bar is not None:
            done = f["total"] - f["remaining"]
            self.bar.update(self.task, total=max(f["total"], 1), completed=done,
                            remaining=_mib(f["remaining"]), dirty=f"{f['dirty_MBps']:.1f} MB/s",
                            mbps=f"{f['mbps']:.0f} Mbit/s", **{"pass": f["pass"]})
        elif f["pass"] != self.last_pass:
            print(f"pass {f['pass']}: remaining {_mib(f['remaining'])} of {_mib(f['total'])}, "
                  f"dirty {f['dirty_MBps']:.1f} MB/s, {f['mbps']:.0f} Mbit/s", flush=True)
            self.last_pass = f["pass"]


def summary_rows(info: dict) -> list[tuple[str, str]]:
    ram = info.get("ram") or {}
    total_ms = info.get("total-time") or 0
    sent = ram.get("transferred") or 0
    rate = sent * 8 / (total_ms / 1000) / 1e6 if total_ms else 0.0
    return [("total time", f"{total_ms} ms"),
            ("downtime", f"{info.get('downtime', '?')} ms"),
            ("setup time", f"{info.get('setup-time', '?')} ms"),
            ("transferred", _mib(sent)),
            # (QEMU's downtime-bytes: what went while the guest was stopped)
            ("sent stopped", _mib(ram["downtime-bytes"]) if "downtime-bytes" in ram else "?"),
            ("passes", str(ram.get("dirty-sync-count", "?"))),
            ("mean rate", f"{rate:.0f} Mbit/s"),      # transferred / total time
            ("zero pages", str(ram.get("duplicate", "?"))),
            ("normal pages", str(ram.get("normal", "?")))]


def print_summary(info: dict, live: bool) -> None:
    rows = summary_rows(info)
    if live:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            live = False
    if not live:
        print("migration completed")
        for k, v in rows:
            print(f"  {k:<14} {v}")
        return
    table = Table(title="migration completed", show_header=False)
    table.add_column("")
    table.add_column("", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)

