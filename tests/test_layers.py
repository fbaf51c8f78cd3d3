"""The layers import only downward, and no module imports itself back through others.

    cli                          the commands (top)
    gateway  scheduler  worker   never one another
    models                       model files, for the gateway and the worker
    inflight                     protocol and plumbing (bottom)

testing/ (the stack launcher and the engine double) sits beside the product for tests
and benchmarks; nothing in the product imports it, tests/ or bench/."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = {"inflight", "models", "gateway", "scheduler", "worker", "cli", "testing", "tests", "bench"}
ALLOWED = {
    "inflight": {"inflight"},
    "models": {"models"},
    "gateway": {"gateway", "models", "inflight"},
    "scheduler": {"scheduler", "inflight"},
    "worker": {"worker", "models", "inflight"},
    "cli": {"cli", "gateway", "scheduler", "worker", "models", "inflight"},
    "testing": {"testing", "cli", "gateway", "scheduler", "worker", "models", "inflight"},
}


def modules() -> dict[str, Path]:
    out = {}
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):  # generated
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path) -> set[str]:
    """Every module of ours `name` imports, at its top or inside a function."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in OURS}


def test_every_import_points_down():
    wrong = []
    for name, path in modules().items():
        layer = name.split(".")[0]
        for target in imports_of(name, path):
            if target.split(".")[0] not in ALLOWED[layer]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    mods = modules()
    graph = {name: {t for t in imports_of(name, path) if t in mods and t != name} for name, path in mods.items()}
    # A package's __init__ is imported on the way to its modules: the edge that matters is
    # the one to the module itself.
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)
