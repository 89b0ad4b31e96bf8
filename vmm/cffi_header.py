"""A cffi cdef read from the C header itself, so the declarations have one copy.

Used by the build scripts (vmm/kvm/_build.py, vmm/net/_build_vnet.py): cffi's cdef
takes plain C declarations and `#define NAME value` integer constants, so the
header's comments, include guard, `#include`s and other directives are dropped.  A
constant defined by an expression, `#define A (8 + B)`, becomes `#define A ...`:
cffi (API mode) takes its value from the compiled C.
"""

from __future__ import annotations

import re

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_DEFINE = re.compile(r"#\s*define\s+(\w+)\s+(\S.*)$")


def cdef_from_header(path: str) -> str:
    with open(path) as f:
        text = _COMMENT.sub("", f.read())
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            out.append(line.rstrip())
        elif m := _DEFINE.match(stripped):
            name, value = m.group(1), m.group(2).strip()
            out.append(stripped if re.fullmatch(r"\S+", value) else f"#define {name} ...")
    return "\n".join(out)
