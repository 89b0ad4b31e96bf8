"""What drives pyvmm from the outside: the benchmarks, the demo, and the harness they
share with the tests and the labs.  None of it is part of the VMM (vmm/).

Installed with pyvmm, so `pyvmm bench downtime|soak|migration` and `pyvmm demo` import it
lazily, and `python -m bench.X` (or `python bench/X.py` for the scripts) runs a
piece on its own.

* `downtime/`: `pyvmm bench downtime`, the live-update downtime sweep, one file per job
* `soak.py`: `pyvmm bench soak`, many live updates in a row under traffic
* `migration.py`: `pyvmm bench migration`, live migration between two hosts, pyvmm beside QEMU
* `vmms.py`: the pyvmm processes a benchmark starts and live-updates, and their clean-up
* `net_throughput.py`, `boot_and_exits.py`, `cpr_costs.py`: stand-alone scripts
* `demo.py`: `pyvmm demo` (`make demo`), a live update with traffic flowing
* `lab.py`: network namespaces with a tap, watched child processes (tests, demo, benchmarks)
* `traffic.py`: the numbered UDP stream run inside such a namespace
* `twohosts.py`: two hosts, a migration link and a client in namespaces (live migration)
* `sockcopy.py`: a plain socket copy over that link, the yardstick for a migration's pass 1
"""
