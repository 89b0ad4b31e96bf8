"""QEMU 10's migration arguments: MigrationAddress, channel lists, legacy URIs, capabilities.

These are checked with QEMU's grammar and wording so that a QEMU recipe's
arguments parse here as they do in QEMU; what pyvmm then does with an address
is the controller's decision, which refuses what it cannot use with a reason.
pyvmm uses few of them: a unix socket path (cpr-transfer's channel, and where a
`pyvmm run --incoming` listens) and `file:` / `exec:` (cpr-exec).  Every other
address still parses because QEMU's cpr-transfer recipe gives a main channel
(tcp, say) beside the cpr channel, which pyvmm checks and does not use.
"""

from __future__ import annotations

import re

from .args import CommandError, check_args, check_enum, check_str_list, check_type

# QAPI SocketAddress (qapi/sockets.json) and the other MigrationAddress transports.
_SOCKET_SPECS = {
    "unix": {"path": (str, True), "abstract": (bool, False), "tight": (bool, False)},
    "inet": {"host": (str, True), "port": (str, True), "numeric": (bool, False),
             "to": (int, False), "ipv4": (bool, False), "ipv6": (bool, False),
             "keep-alive": (bool, False)},
    "vsock": {"cid": (str, True), "port": (str, True)},
    "fd": {"str": (str, True)},
}
_TRANSPORT_SPECS = {
    "file": {"filename": (str, True), "offset": (int, False)},
    "exec": {"args": (check_str_list, True)},
    "rdma": {"host": (str, True), "port": (str, True)},
}


def check_migration_address(addr, name: str = "addr") -> dict:
    """Validate a QAPI MigrationAddress into a plain dict of its members."""
    check_type(addr, dict, name)
    prefix = name + "."
    transport = addr.get("transport")
    if transport is None:
        raise CommandError(f"Parameter '{prefix}transport' is missing")
    check_enum(transport, ("socket", "exec", "rdma", "file"), prefix + "transport")
    rest = {k: v for k, v in addr.items() if k != "transport"}
    if transport == "socket":
        kind = rest.pop("type", None)
        if kind is None:
            raise CommandError(f"Parameter '{prefix}type' is missing")
        check_enum(kind, tuple(_SOCKET_SPECS), prefix + "type")
        members = check_args(rest, _SOCKET_SPECS[kind], prefix)
        return {"transport": "socket", "type": kind, **members}
    members = check_args(rest, _TRANSPORT_SPECS[transport], prefix)
    return {"transport": transport, **members}


def parse_migration_uri(uri: str) -> dict:
    """Turn a legacy migrate URI into the MigrationAddress it stands for."""
    scheme, sep, rest = uri.partition(":")
    if sep and scheme == "unix" and rest:
        return {"transport": "socket", "type": "unix", "path": rest}
    if sep and scheme == "fd" and rest:
        return {"transport": "socket", "type": "fd", "str": rest}
    if sep and scheme == "exec":
        return {"transport": "exec", "args": ["/bin/sh", "-c", rest]}
    if sep and scheme in ("tcp", "rdma") and rest:
        m = re.fullmatch(r"\[([^\]]+)\]:(\w+)|([^:\[\]]*):(\w+)", rest)
        if m:
            host = m.group(1) if m.group(1) is not None else m.group(3)
            port = m.group(2) or m.group(4)
            if scheme == "rdma":
                return {"transport": "rdma", "host": host, "port": port}
            return {"transport": "socket", "type": "inet", "host": host, "port": port}
        raise CommandError(f"Invalid migration URI '{uri}': expected {scheme}:HOST:PORT")
    if sep and scheme == "file" and rest:
        filename, comma, option = rest.partition(",")
        addr = {"transport": "file", "filename": filename}
        if comma:
            key, _, value = option.partition("=")
            try:
                if key != "offset":
                    raise ValueError
                addr["offset"] = int(value, 0)
            except ValueError:
                raise CommandError(f"Invalid migration URI '{uri}': "
                                   "the only option is offset=N") from None
        return addr
    raise CommandError(f"unknown migration protocol: {uri}")


def check_channels(value, name) -> dict:
    """A MigrationChannel list: {"main": MigrationAddress, "cpr": MigrationAddress}
    with the channels given (each type at most once)."""
    check_type(value, list, name)
    found = {}
    for i, chan in enumerate(value):
        cname = f"{name}[{i}]"
        check_type(chan, dict, cname)
        chan = check_args(chan, {"channel-type": (("main", "cpr"), True),
                                 "addr": (dict, True)}, cname + ".")
        kind = chan["channel-type"]
        if kind in found:
            raise CommandError(f"Channel list has more than one {kind} entry")
        found[kind] = check_migration_address(chan["addr"], cname + ".addr")
    return found


def migrate_channels(args: dict) -> tuple[dict, dict | None]:
    """`migrate`'s checked `uri` or `channels`: (main address, cpr address or None)."""
    uri, channels = args.get("uri"), args.get("channels")
    if uri is not None and channels is not None:
        raise CommandError("'uri' and 'channels' arguments are mutually exclusive; exactly "
                           "one of the two should be present in 'migrate' qmp command")
    if channels is not None:
        if "main" not in channels:
            raise CommandError("missing 'main' migration channel")
        return channels["main"], channels.get("cpr")
    if uri is not None:
        return parse_migration_uri(uri), None
    raise CommandError("neither 'uri' or 'channels' argument are specified in "
                       "'migrate' qmp command")


def incoming_channel(args: dict) -> dict:
    """`migrate-incoming`'s checked `uri` or `channels`: the main address."""
    uri, channels = args.get("uri"), args.get("channels")
    if (uri is None) == (channels is None):
        raise CommandError("need either 'uri' or 'channels' argument")
    if channels is not None:
        if list(channels) != ["main"]:
            raise CommandError("Channel list must have only one entry, for type 'main'")
        return channels["main"]
    return parse_migration_uri(uri)


def check_faults(value, name):
    """x-fault (pyvmm): fault points to arm, "a,b" or ["a", "b"]."""
    if isinstance(value, str):
        return value
    return check_str_list(value, name)


#: QEMU 10's MigrationCapability names, in its order.
MIGRATION_CAPABILITY_NAMES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "events", "postcopy-ram", "x-colo",
    "release-ram", "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps",
    "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
    "background-snapshot", "zero-copy-send", "postcopy-preempt", "switchover-ack",
    "dirty-limit", "mapped-ram")


def check_capabilities(value, name):
    """migrate-set-capabilities: a list of MigrationCapabilityStatus."""
    check_type(value, list, name)
    return [check_args(check_type(cap, dict, f"{name}[{i}]"),
                       {"capability": (MIGRATION_CAPABILITY_NAMES, True),
                        "state": (bool, True)}, f"{name}[{i}].")
            for i, cap in enumerate(value)]
