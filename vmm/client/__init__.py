"""pyvmm's client side: what talks to a running pyvmm over its QMP socket.

It is a separate layer from the VMM: the VMM never imports it (vmm/cli.py only
hands `pyvmm cpr`, `pyvmm migrate` and `pyvmm state` to it), and it takes from the VMM only what
describes the wire (the live-update phases it prints) and VmmError.

`qmp.py` is the QMP client (also used by the tests, the benchmarks and the labs),
`cpr.py` drives `pyvmm cpr` and holds the one wait on `query-migrate`,
`migrate.py` drives `pyvmm migrate` (precopy to another host, progress, summary),
`trace_plot.py` draws its `--trace-plot`, `view.py` prints `pyvmm state`.
"""

from .qmp import QmpClient, QmpError

__all__ = ["QmpClient", "QmpError"]
