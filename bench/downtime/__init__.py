"""`pyvmm bench downtime`: CPR live-update downtime, swept over RAM size, mode, load.

    python3 -m bench.downtime [--quick] [--sizes 256M,1G,4G,16G] [--reps 5] [--out DIR]

For every (mode, RAM size, RAM untouched|touched, idle|UDP load) it boots a
guest in a real pyvmm process, live-updates it `--reps` times and records three
views of the downtime:

* host:    `x-downtime-us` from the new VMM's `query-migrate` (stop -> last vCPU
           back in KVM_RUN), plus the phase breakdown `x-phases-us`;
* guest:   ticker's `maxgap_us` after the update (the guest's largest gap
           between two loop iterations), and the largest gap between two
           heartbeat lines (ticker period_us=1000) as timestamped on the host
           when they arrive on pyvmm's stdout;
* network: the largest gap in a 1 ms UDP echo stream through netecho, in a
           network namespace made for the run, with lost/duplicated datagrams.

Baselines on the same guest image: (a) a naive snapshot done with pyvmm's own
API in-process (pause, save state, copy guest RAM to a file and back, restore,
resume); (b) Debian's QEMU doing a local live migration with RAM in a shared
/dev/shm file and `x-ignore-shared` (RAM not copied), downtime from the
source's STOP event to the destination's RESUME event; (c) QEMU 10.2.2's own
cpr-transfer and cpr-exec (built by bench/qemu10.py), interleaved with pyvmm
updates of the same guest, both measured the same way: the serial line through
one FIFO stamped on the host, the gap at the switch, each VMM's own downtime.

Writes results.md, results.json, downtime_vs_ram.png, phases.png to --out.
Everything started (processes, namespaces, /dev/shm files) is removed at the
end, also on failure or Ctrl-C.

One file per job: `sweep.py` (options, plan, progress, writing the results),
`runs.py` (a pyvmm configuration), `baselines.py` (naive snapshot, QEMU 7.2),
`qemu10.py` (QEMU 10 beside pyvmm),
`heartbeat.py` (the guest's and the host's view), `stats.py`, `report.py` (the
Markdown), `plots.py`; bench/vmms.py starts and updates the pyvmm processes.
"""

from bench.downtime.sweep import main

__all__ = ["main"]
