"""Live updates across pyvmm versions: whom this pyvmm takes a guest from, and how.

A live update exists to replace the VMM binary (a security fix, a new release), so
the old and the new pyvmm are often different versions.  The promise
(docs/CPR.md, "Upgrades and compatibility"): a pyvmm takes a guest over from the
previous release (N-1) and from its own version; anything else, older, newer or
unknown, is refused BEFORE the old VMM stops its guest, with a message naming both
versions.  Everything that decides it, and every conversion of an N-1 state tree
into this version's, lives here:

- `peer_problem(version, protocol)`: why a peer of that version cannot hand us a
  guest (None if it can).  The new VMM asks it of the old one's `hello`
  (cpr-transfer) and of the cpr-exec dry run's environment (cpr-exec), both before
  the stop; the old VMM refuses a new one that does not say its version.
- `to_current(state)`: the one entry point of the load path (vmm.state.loads,
  before the schema check): the tree an N-1 pyvmm saved, converted into this
  version's.  A conversion is a function in CONVERSIONS, keyed by the writer's
  version; it gets the decoded tree and returns it in this version's layout.

What the old pyvmm sends says its version: `pyvmm` (and the protocol number in
`version`) in `hello` and `prepared`, `cpr.pyvmm` in the state blob.  0.1.0 sent
none of them: an absent version is 0.1.0.

This module is imported on the cpr-exec resume path only for a state of another
version (every import there is downtime): keep it small, importing nothing at the top.
"""

from __future__ import annotations

from . import __version__

#: The live-update protocol each version speaks: the cpr-transfer channel's messages
#: and the cpr-exec environment (PYVMM_CPR_EXEC_STATE ...).  2: `pyvmm` and `version`
#: in hello/prepared, cpr.pyvmm in the state, the dry run's version check, and "go" as
#: the claim of a commit page sent with hello (vmm/cpr/commit.py) instead of the
#: restored/go messages (still spoken to a 0.1.0 old VMM, which sends no page).
PROTOCOLS = {"0.1.0": 1, "0.2.0": 2}
PROTOCOL = PROTOCOLS[__version__]
#: What a peer that says no version is: the first release, which said none.
UNVERSIONED = "0.1.0"
#: The state trees this version converts (writer's version -> function), N-1's.
CONVERSIONS = {}


def _from_0_1(state: dict) -> dict:
    """0.1.0's state tree in 0.2.0's layout: only the devices differ (one entry per
    device, each queue saved once: vmm/devices/compat.py)."""
    if isinstance(state.get("devices"), dict):
        from .devices.compat import devices_from_0_1
        state["devices"] = devices_from_0_1(state["devices"])
    return state


CONVERSIONS["0.1.0"] = _from_0_1
#: Whom this version takes a guest from: the previous release and itself.
READS = tuple(CONVERSIONS) + (__version__,)


def describe(version: str, protocol=None) -> str:
    """'pyvmm 0.1.0 (live-update protocol 1)' for messages."""
    proto = PROTOCOLS.get(version) if protocol is None else protocol
    return f"pyvmm {version}" + (f" (live-update protocol {proto})" if proto is not None else "")


def peer_problem(version, protocol) -> str | None:
    """Why the old pyvmm `version` speaking `protocol` cannot hand this one its guest,
    or None.  Both as the peer sent them (None: it sent none, as 0.1.0 did)."""
    said = UNVERSIONED if version is None else str(version)[:40]
    proto = PROTOCOLS[UNVERSIONED] if protocol is None else protocol
    if said in READS and proto == PROTOCOLS.get(said):
        return None
    who = (f"pyvmm {said}" if version is not None else
           f"a pyvmm that says no version (as {UNVERSIONED})") + \
        f" speaking live-update protocol {str(proto)[:20]}"
    reads = " or ".join(describe(v) for v in READS)
    return (f"the old pyvmm is {who}; this one, {describe(__version__)}, takes a guest "
            f"only from {reads} (refused before the stop; {_advice(said)})")


def target_problem(version) -> str | None:
    """Why this (old) pyvmm must not hand its guest to a new pyvmm that said `version`
    in its `prepared` (None: it did, so it checked our hello and reads our state).  A
    new pyvmm that says no version is older than 0.2.0: a downgrade."""
    if version is None:
        return (f"the new pyvmm says no version: it is older than this {describe(__version__)} "
                "and cannot read its state (a downgrade; refused before the stop, the guest "
                "runs on here)")
    return None


def hello_refused(desc: str) -> str:
    """What to report when the new pyvmm refused our `hello`: 0.1.0 refuses any other
    protocol with 'the old pyvmm speaks live-update protocol N, this one M'; say what
    that means (a downgrade) with both versions."""
    import re
    m = re.search(r"speaks live-update protocol \S+, this one (\d+)$", desc)
    if not m:
        return desc
    theirs = int(m.group(1))
    named = [v for v, p in PROTOCOLS.items() if p == theirs]
    peer = describe(named[0]) if named else f"a pyvmm of live-update protocol {theirs}"
    return (f"{desc}: the new pyvmm is {peer}, older than this {describe(__version__)}, "
            "and cannot read its state (a downgrade; refused before the stop, the guest runs "
            "on here)")


def _advice(version: str) -> str:
    try:
        newer = tuple(int(x) for x in version.split(".")) > \
            tuple(int(x) for x in __version__.split("."))
    except ValueError:
        newer = False
    if newer:
        return f"a downgrade: the new pyvmm must be {version} or newer"
    if version in READS:
        return f"{version} speaks live-update protocol {PROTOCOLS[version]}"
    return f"update through each release in turn, from {READS[0]} at the oldest"


def writer(state: dict) -> str:
    """The version of the pyvmm that saved a live update's state tree."""
    cpr = state.get("cpr")
    version = cpr.get("pyvmm") if isinstance(cpr, dict) else None
    return UNVERSIONED if version is None else version


def to_current(state: dict) -> dict:
    """A live update's state tree in this version's layout (vmm.state.loads calls it
    before the schema check); StateError if no conversion from its writer exists."""
    version = writer(state)
    if version == __version__:
        return state
    convert = CONVERSIONS.get(version) if isinstance(version, str) else None
    if convert is None:
        from .state import StateError
        raise StateError(f"the state was saved by pyvmm {str(version)[:40]}; this pyvmm "
                         f"{__version__} reads the state of pyvmm "
                         f"{' or '.join(READS)}")
    return convert(state)
