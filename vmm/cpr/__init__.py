"""CPR live update: stop -> notify -> save -> transfer, in cpr-exec and cpr-transfer modes.

The order is the point (see QEMU's "migration: stop vm earlier for cpr"):
the new VMM uses the devices the moment it receives their fds, so the old one
must have stopped the guest (vCPUs paused, data paths quiesced) and released
every device before any device fd leaves it.
"""
