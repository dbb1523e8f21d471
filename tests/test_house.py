"""The house: the module import graph (imports inside functions included) has no cycle, and the
rooms stand where the layout says: evaluation/ and inference/ import nothing from training/, core/
imports none of training/, evaluation/, inference/, the model imports no data pipeline, and the mask
rule sits below the attention kernels."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("g2vlm_jax", "data_pipelines")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its text (function bodies included)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a non-module name: its module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


GRAPH = import_graph()


def test_the_graph_reads_function_level_imports():
    assert "g2vlm_jax.model.kernels.tpu_flash" in GRAPH["g2vlm_jax.model.attention"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert find_cycle(GRAPH) is None


@pytest.mark.parametrize("room, forbidden", [
    ("g2vlm_jax.evaluation", ("g2vlm_jax.training",)),
    ("g2vlm_jax.inference", ("g2vlm_jax.training",)),
    ("g2vlm_jax.core", ("g2vlm_jax.training", "g2vlm_jax.evaluation", "g2vlm_jax.inference")),
    ("g2vlm_jax.checkpoint", ("g2vlm_jax.training", "g2vlm_jax.evaluation", "g2vlm_jax.inference")),
    ("g2vlm_jax.model", ("data_pipelines", "g2vlm_jax.training", "g2vlm_jax.evaluation", "g2vlm_jax.core")),
    ("g2vlm_jax.model.mask", ("g2vlm_jax.model.kernels", "g2vlm_jax.model.attention")),
    ("g2vlm_jax.training", ("g2vlm_jax.evaluation",)),
])
def test_arrows_point_one_way(room, forbidden):
    bad = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if m == room or m.startswith(room + ".")
                 for t in targets if any(t == f or t.startswith(f + ".") for f in forbidden))
    assert not bad, bad
