"""The layout rule: vmm/ is the VMM; its client side (vmm/client/) and the tools that
drive it from outside (bench/) sit apart.  The VMM imports neither: only vmm/cli.py
hands `pyvmm cpr`, `pyvmm state`, `pyvmm bench` and `pyvmm demo` to them."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT


def imported(path: Path):
    """The modules (and names) a file imports, relative imports made absolute."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module
            yield from (f"{module}.{a.name}" for a in node.names)


def test_the_vmm_imports_neither_its_client_side_nor_the_tools():
    bad = []
    for path in sorted((ROOT / "vmm").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel == Path("vmm/cli.py"):
            continue
        outside = ("bench",) if rel.parts[:2] == ("vmm", "client") else ("bench", "vmm.client")
        bad += [f"{rel} imports {m}" for m in imported(path)
                if any(m == o or m.startswith(o + ".") for o in outside)]
    assert not bad, "\n".join(bad)
    assert "vmm.client.cpr" in set(imported(ROOT / "vmm/cli.py"))   # the check sees imports
