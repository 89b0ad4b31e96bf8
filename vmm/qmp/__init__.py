"""A QMP-compatible monitor: the socket that tools drive pyvmm through.

The wire protocol follows QEMU's docs/interop/qmp-spec.rst closely enough
that QEMU's own Python library (qemu.qmp) and scripts written for QEMU 10
can drive pyvmm: the greeting, capabilities negotiation, the error classes
and most error messages are QEMU's.  docs/QMP.md lists the commands and where
they differ from QEMU's.

This package speaks the protocol and knows nothing about the machine; what the
commands drive is a controller (vmm/control.py).  One job per module:

    framing.py         bytes -> JSON values (QEMU's json-streamer: nesting, size limits)
    args.py            checking a command's arguments, with QEMU's wording
    migration_args.py  QEMU's migration addresses, channels, URIs and capabilities
    commands.py        the command table: a request -> the controller -> a reply
    server.py          the unix socket: clients, limits, events, the live-update handoff

Nothing is imported here, so that a caller that only checks arguments (the
`--incoming` command line) does not import the server.
"""
