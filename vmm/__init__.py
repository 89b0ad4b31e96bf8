"""pyvmm: a small KVM virtual machine monitor with CPR live update."""

# The one place the version is written (pyproject.toml reads it; RELEASES.md lists the
# released ones with their commits).  A live update carries it to the new VMM, which
# takes a guest over from the previous release and from its own (vmm/compat.py).
__version__ = "0.2.0"
