"""Checking a QMP command's arguments against its spec, with QEMU's wording.

QEMU's QAPI visitors refuse a wrong argument before the command runs, with
messages tools and people know ("Parameter 'x' is missing", "Invalid
parameter type for 'x', expected: string"); these checkers say the same.
"""

from __future__ import annotations


class CommandError(Exception):
    """A command failed; sent as {"error": {"class": ..., "desc": ...}}."""

    def __init__(self, desc: str, error_class: str = "GenericError"):
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


_TYPE_NAMES = {str: "string", bool: "boolean", int: "integer", list: "array", dict: "object"}


def check_type(value, kind, name):
    """`value` if it is a `kind` (a bool is not an int, as in JSON)."""
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise CommandError(f"Invalid parameter type for '{name}', expected: {_TYPE_NAMES[kind]}")
    return value


def check_enum(value, choices, name):
    """`value` if it is one of the strings `choices` (a QAPI enum)."""
    check_type(value, str, name)
    if value not in choices:
        raise CommandError(f"Parameter '{name}' does not accept value '{value}'")
    return value


def check_str_list(value, name):
    """A copy of `value` if it is a list of strings."""
    check_type(value, list, name)
    for i, item in enumerate(value):
        check_type(item, str, f"{name}[{i}]")
    return list(value)


def check_args(args: dict, spec: dict, prefix: str = "") -> dict:
    """Validate `args` against `spec` {name: (checker, required)}.

    A checker is a type (str, bool, int, list, dict), a tuple of allowed
    strings (an enum), or a function (value, full_name) -> value.
    Returns a new dict holding only the arguments that were given.
    """
    for key in args:
        if key not in spec:
            raise CommandError(f"Parameter '{prefix}{key}' is unexpected")
    out = {}
    for key, (checker, required) in spec.items():
        name = prefix + key
        if key not in args:
            if required:
                raise CommandError(f"Parameter '{name}' is missing")
            continue
        value = args[key]
        if isinstance(checker, type):
            out[key] = check_type(value, checker, name)
        elif isinstance(checker, tuple):
            out[key] = check_enum(value, checker, name)
        else:
            out[key] = checker(value, name)
    return out
