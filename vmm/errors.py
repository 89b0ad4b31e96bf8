"""Exceptions pyvmm raises.

Every error a user can cause (a bad kernel image, a missing /dev/kvm, a corrupt
state blob) is a VmmError with a message that says what to do; the CLI prints
that message on one line instead of a traceback.
"""


class VmmError(Exception):
    """Base class: an error with a message meant for the user."""


class KvmError(VmmError):
    """KVM is missing, refused an ioctl, or lacks a needed capability."""


class GuestMemoryError(VmmError):
    """A guest-physical range falls outside guest RAM."""


class BootError(VmmError):
    """The kernel image cannot be booted (missing, not ELF, not PVH, ...)."""


class DeviceError(VmmError):
    """A device backend (tap, vhost, ...) could not be set up."""


class GuestError(VmmError):
    """The guest stopped the VM: a triple fault, an unhandled exit, ..."""
