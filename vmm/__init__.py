"""pyvmm: a small KVM virtual machine monitor with CPR live update."""

__version__ = "0.1.0"
