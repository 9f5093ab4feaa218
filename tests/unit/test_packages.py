"""Every executable the driver runs comes from a Debian package in deploy/packages.txt, the list the
Dockerfile and the e2e image builder install. Found statically: the argv lists handed to the runner."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNNER_CALLS = {"run", "_run"}
# Code that runs on the machine hosting the lab (the demo, the UML harness), not in the driver's image.
LAB_SIDE = {"lab", "demo.py", "proto"}


def packages() -> set[str]:
    lines = (ROOT / "deploy" / "packages.txt").read_text().splitlines()
    return {line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()}


def executables() -> dict[str, str]:
    """argv[0] -> where, for every list literal that reaches a runner call in csi/ (LAB_SIDE excluded)."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "csi").rglob("*.py")):
        if path.relative_to(ROOT / "csi").parts[0] in LAB_SIDE:
            continue
        tree = ast.parse(path.read_text())
        # argv builders: a function that returns a list literal (`return [*self.prefix, "iscsiadm", *args]`)
        built = {f.name: r.value for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for r in ast.walk(f) if isinstance(r, ast.Return) and isinstance(r.value, ast.List)}
        # argv prefixes: a module's *_PREFIX tuple runs before another tool (nsenter before iscsiadm)
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List)) and node.value.elts \
                    and isinstance(node.value.elts[0], ast.Constant) and \
                    any(isinstance(t, ast.Name) and t.id.endswith("_PREFIX") for t in node.targets):
                found.setdefault(node.value.elts[0].value, f"{path.relative_to(ROOT)}:{node.lineno}")
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            assigned = {}
            for node in ast.walk(func):
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
                    for t in node.targets:
                        if isinstance(t, ast.Name):
                            assigned[t.id] = node.value
            for node in ast.walk(func):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name not in RUNNER_CALLS:
                    continue
                arg = node.args[0]
                while isinstance(arg, ast.BinOp):   # argv + [...]
                    arg = arg.left
                if isinstance(arg, ast.Name):
                    arg = assigned.get(arg.id)
                if isinstance(arg, ast.Call):
                    callee = arg.func.attr if isinstance(arg.func, ast.Attribute) else getattr(arg.func, "id", "")
                    arg = built.get(callee)
                elts = list(arg.elts) if isinstance(arg, ast.List) else []
                while elts and isinstance(elts[0], ast.Starred):   # [*prefix, "tool", ...]
                    elts.pop(0)
                if elts and isinstance(elts[0], ast.Constant):
                    found.setdefault(elts[0].value, f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_the_scan_finds_the_tools_we_know_of():
    exe = executables()
    for tool in ("lvcreate", "lvs", "iscsiadm", "nsenter", "mount", "mkfs.ext4", "modprobe", "blkid", "resize2fs"):
        assert tool in exe, f"{tool} not found: the scan no longer sees the runner calls"


def test_every_executable_comes_from_a_listed_package():
    assert shutil.which("dpkg-query"), "dpkg-query is missing: run this on Debian (scripts/setup)"
    wanted = packages()
    exe = executables()
    r = subprocess.run(["dpkg-query", "-S", *(f"*bin/{tool}" for tool in exe)], capture_output=True, text=True)
    owners: dict[str, set[str]] = {}
    for line in r.stdout.splitlines():
        pkgs, _, path = line.partition(": ")
        tool = path.rsplit("/", 1)[-1]
        if tool in exe and path.endswith(f"bin/{tool}"):
            owners.setdefault(tool, set()).update(p.strip() for p in pkgs.split(","))
    problems = []
    for tool, where in sorted(exe.items()):
        if tool not in owners:
            problems.append(f"{tool} ({where}): no installed Debian package ships it (run scripts/setup)")
        elif not owners[tool] & wanted:
            problems.append(f"{tool} ({where}) comes from {', '.join(sorted(owners[tool]))}, "
                            "not in deploy/packages.txt")
    assert not problems, "\n".join(problems)
