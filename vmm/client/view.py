"""`pyvmm state`: print a running VM's state, as its QMP x-query-state returns it
(registers, memory, devices; vmm/summary.py builds it inside the VMM)."""

from __future__ import annotations

import json
import sys

from .qmp import START_WAIT_S, QmpClient


def cmd_state(args) -> int:
    with QmpClient(args.socket, wait=START_WAIT_S) as client:
        state = client.execute("x-query-state")
    json.dump(state, sys.stdout, indent=2)
    print()
    return 0
