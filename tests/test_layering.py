"""Imports flow one way (BUILD_NOTES, architecture): launch/ -> rl, training, factory -> agent, data, sampling, models
-> sharding, kernels; the model knows nothing of data or training; sandbox, rubric and tasks know nothing of JAX;
kernels import nothing of klong_jax; nothing imports launch/. Read from the source (every import statement, at any
depth in a module), so a lazy import inside a function counts too."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_MODULES = ("jax", "jaxlib", "flax", "optax", "orbax", "chex")
# Packages of klong_jax that run JAX (directly or through what they import).
JAX_PACKAGES = ("models", "sharding", "sampling", "training", "rl", "agent", "serving", "hf", "planning",
                "model_checkpoint")
NO_JAX = ("sandbox", "rubric", "tasks")
ALLOWED = {   # package -> the klong_jax packages (and top-level kernels) it may import
    "models": {"kernels", "sharding", "config_mapping"},
    "sharding": set(),
    "kernels": set(),
    "sandbox": set(),
    "rubric": {"sandbox"},
    "tasks": {"rubric", "sandbox"},
}


def imports_of(path: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def package_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(klong_jax package -> packages it imports, package -> external top-level modules it imports); the
    package of klong_jax/x/y.py is x, of klong_jax/x.py x; kernels/ is the package "kernels"."""
    graph, external = {}, {}
    for top in ("klong_jax", "kernels"):
        for root, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(root, name), ROOT)[:-3].split(os.sep)
                pkg = "kernels" if top == "kernels" else (rel[1] if len(rel) > 1 and rel[1] != "__init__" else None)
                if pkg is None:
                    continue
                for mod in imports_of(os.path.join(root, name)):
                    parts = mod.split(".")
                    if parts[0] == "klong_jax" and len(parts) > 1 and parts[1] != pkg:
                        graph.setdefault(pkg, set()).add(parts[1])
                    elif parts[0] in ("kernels", "launch", "configs", "tools") and parts[0] != pkg:
                        graph.setdefault(pkg, set()).add(parts[0])
                    elif parts[0] not in ("klong_jax", "kernels"):
                        external.setdefault(pkg, set()).add(parts[0])
                graph.setdefault(pkg, set())
    return graph, external


GRAPH, EXTERNAL = package_graph()


def test_the_graph_was_read():
    # The packages the architecture names are all there, with the edges everyone relies on.
    assert {"models", "sharding", "data", "training", "rl", "agent", "sandbox", "rubric", "tasks", "factory",
            "kernels"} <= set(GRAPH)
    assert "models" in GRAPH["training"] and "training" in GRAPH["rl"] and "kernels" in GRAPH["models"]


def test_nothing_imports_launch_configs_or_tools():
    offenders = {pkg: deps & {"launch", "configs", "tools"} for pkg, deps in GRAPH.items()}
    assert not {k: v for k, v in offenders.items() if v}


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_lower_layers_import_only_what_they_may(pkg):
    assert GRAPH[pkg] <= ALLOWED[pkg], f"klong_jax.{pkg} imports {sorted(GRAPH[pkg] - ALLOWED[pkg])}"


@pytest.mark.parametrize("pkg", NO_JAX)
def test_sandbox_rubric_and_tasks_know_nothing_of_jax(pkg):
    assert not EXTERNAL.get(pkg, set()) & set(JAX_MODULES), f"klong_jax.{pkg} imports {EXTERNAL[pkg]}"
    assert not GRAPH[pkg] & set(JAX_PACKAGES), f"klong_jax.{pkg} imports {sorted(GRAPH[pkg])}"


def test_no_cycle_between_packages():
    state: dict[str, int] = {}   # 1: on the current path, 2: done

    def visit(node, path):
        if state.get(node) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(node):] + [node])}")
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in sorted(GRAPH.get(node, ())):
            visit(dep, path + [node])
        state[node] = 2

    for node in sorted(GRAPH):
        visit(node, [])


def test_a_cycle_is_found():
    # The check itself: an edge back up (models -> training) closes a cycle through training -> models.
    global GRAPH
    saved = GRAPH
    GRAPH = {k: set(v) for k, v in saved.items()}
    GRAPH["models"].add("training")
    try:
        with pytest.raises(AssertionError, match="import cycle"):
            test_no_cycle_between_packages()
    finally:
        GRAPH = saved
