"""The tree's layers, checked on the source (the map is ``toolkit/__init__.py``'s docstring):
imports only go down, DeepSpeed is ZeRO's module's (and its CPU Adam op's loader's), FSDP's
and DDP's are theirs, the language model package and the experiment tools are leaves that
the engine never imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "toolkit").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def toolkit_imports(name: str, path: Path, known: dict) -> set[str]:
    return {m for m in imports(path) if m in known and m != name}


def test_the_import_graph_has_no_cycle():
    known = modules()
    graph = {n: toolkit_imports(n, p, known) for n, p in known.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if nxt == node.rpartition(".")[0] or node.startswith(nxt + "."):
                continue  # a module of a package and the package's own __init__
            assert state.get(nxt) != 1, " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for n in graph:
        if n not in state:
            visit(n, [])


def test_deepspeed_and_fsdp_are_their_strategy_modules():
    for name, path in modules().items():
        found = imports(path)
        if any(m.split(".")[0] == "deepspeed" for m in found):
            # ZeRO, and the CPU Adam op an optimizer kernel loads (its op builder alone).
            assert name in ("toolkit.parallel.zero", "toolkit.cpu_adam"), name
        if any(m.startswith("torch.distributed.fsdp") or m.startswith(
                "torch.distributed.checkpoint") for m in found):
            assert name == "toolkit.parallel.fsdp2", name
        assert "DEEPSPEED" not in path.read_text() or name == "toolkit.parallel.zero", name


# The layer map of toolkit/__init__.py: a module imports modules of its own layer or of
# layers before it (a package's name covers its modules).
LAYERS = [
    ["toolkit.errors", "toolkit.atomic"],
    ["toolkit.optim", "toolkit.cpu_adam", "toolkit.schedule", "toolkit.target",
     "toolkit.batchnorm", "toolkit.models", "toolkit.parallel.base"],
    ["toolkit.parallel", "toolkit.distributed", "toolkit.lifecycle"],
    ["toolkit.sampler", "toolkit.data", "toolkit.tta"],
    ["toolkit.config"],
    ["toolkit.checkpoint", "toolkit.run_folder", "toolkit.stages", "toolkit.provenance",
     "toolkit.lr_finder", "toolkit.resume", "toolkit.trainer", "toolkit.trackers"],
    ["toolkit.lm"],
    ["toolkit.recipe", "toolkit.evaluate"],
    ["toolkit.experiments"],
    ["toolkit.cli"],
]


def layer_of(name: str) -> int:
    """The layer of module ``name``: that of the longest prefix in :data:`LAYERS`."""
    best = max((p for layer in LAYERS for p in layer if name == p or name.startswith(p + ".")),
               key=len)
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def test_imports_only_go_down_the_layer_map():
    known = modules()
    for name, path in known.items():
        if name == "toolkit":
            continue
        for imported in toolkit_imports(name, path, known) - {"toolkit"}:
            assert layer_of(imported) <= layer_of(name), \
                f"{name} (layer {layer_of(name)}) imports {imported} (layer {layer_of(imported)})"


def test_the_leaves_are_imported_only_from_above():
    # Who may import the language-model package and the experiment tools.
    above = {"toolkit.lm": ("toolkit.lm", "toolkit.evaluate", "toolkit.experiments",
                            "toolkit.cli"),
             "toolkit.experiments": ("toolkit.experiments", "toolkit.cli"),
             "toolkit.recipe": ("toolkit.evaluate", "toolkit.cli", "toolkit.experiments"),
             "toolkit.evaluate": ("toolkit.cli",)}
    known = modules()
    for name, path in known.items():
        for imported in toolkit_imports(name, path, known):
            for leaf, allowed in above.items():
                if imported == leaf or imported.startswith(leaf + "."):
                    assert name.startswith(allowed), f"{name} imports {imported}"
