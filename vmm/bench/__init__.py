"""Benchmarks that drive pyvmm end to end (`pyvmm bench ...`).

`vmm.bench.downtime`: the CPR live-update downtime suite (see bench/README.md).
"""
