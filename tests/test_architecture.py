"""The import graph of ``ragr1_verl`` and ``retriever_server`` against the layers they are built in.

Every import counts: at the top of a module, inside a function (an import placed there to save start-up
time is still a dependency), relative or absolute. A module may import from its own layer or a lower one,
never from a higher one, and no set of modules may import each other in a cycle. A new module must be given
a layer here (the test names any that has none), which is where its place in the design is decided.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ragr1_verl", "retriever_server")

# Bottom first. A pattern names a module or, ending in ``*``, a module and everything below it; the first
# layer (in this order) with a matching pattern is the module's.
LAYERS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "ragr1_verl": (
        ("base: the package, record files, settings", ("ragr1_verl", "ragr1_verl.records", "ragr1_verl.settings", "ragr1_verl.environment", "ragr1_verl.configs",
                                             "ragr1_verl.recipes")),
        ("protocol and the retrieval client (pure, no verl)", ("ragr1_verl.protocol*", "ragr1_verl.retrieval_client")),
        ("settings, the verl seam, the reward, the LLM client", ("ragr1_verl.config", "ragr1_verl.verl_compat",
                                                                 "ragr1_verl.reward", "ragr1_verl.openai_client")),
        ("rollout, training data, SFT, the CPU port", ("ragr1_verl.agent_loop", "ragr1_verl.search_tool",
                                                        "ragr1_verl.metrics", "ragr1_verl.cpu*", "ragr1_verl.sft*",
                                                        "ragr1_verl.data*")),
        ("evaluation", ("ragr1_verl.evaluation.backends", "ragr1_verl.evaluation.protocols",
                        "ragr1_verl.evaluation.runner", "ragr1_verl.evaluation.report", "ragr1_verl.evaluation.stats",
                        "ragr1_verl.evaluation")),
        ("the CPU demo", ("ragr1_verl.demo*",)),
        ("entry points", ("ragr1_verl.evaluation.cli", "ragr1_verl.verl_plugin")),
    ),
    "retriever_server": (
        ("base: corpus, encoders, searchers' kernels, metrics", (
            "retriever_server", "retriever_server.corpus", "retriever_server.cpus", "retriever_server.heap",
            "retriever_server.metrics", "retriever_server.responses", "retriever_server.wire",
            "retriever_server.encoders", "retriever_server.encoder_backends", "retriever_server.bm25",
            "retriever_server.dense",
            "retriever_server.supervisor", "retriever_server.environment", "retriever_server.stack_dump")),
        ("index folders: manifest, shards, plans, loading, batching", (
            "retriever_server.manifest", "retriever_server.sharding", "retriever_server.sharded",
            "retriever_server.backends", "retriever_server.plan", "retriever_server.builder",
            "retriever_server.searchers", "retriever_server.batcher", "retriever_server.encoder_choice")),
        ("serving: the service, Ray Serve shards, the HTTP app", (
            "retriever_server.service", "retriever_server.ray_serve", "retriever_server.app",
            "retriever_server.http_server")),
        ("entry points and the demo index", ("retriever_server.cli", "retriever_server.index_cli",
                                             "retriever_server.demo")),
    ),
}
# ragr1_verl may use the retriever (to serve the demo index) only from these layers up; the retriever never
# imports ragr1_verl (it is installed and run on its own).
RETRIEVER_FROM = "the CPU demo"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


def imported_names(path: Path, module: str) -> Iterator[str]:
    """Every module name an import statement in ``path`` may refer to (``from a import b``: ``a`` and
    ``a.b``, since ``b`` may be a submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    def ours(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        targets = {ours(name) for name in imported_names(path, module)}
        graph[module] = {target for target in targets if target and target != module}
    return graph


def layer_of(module: str) -> tuple[str, int, str] | None:
    """(package, layer number, layer name) of a module, None when no layer names it."""
    package = module.partition(".")[0]
    for number, (name, patterns) in enumerate(LAYERS.get(package, ())):
        if any(fnmatch.fnmatchcase(module, pattern) or (pattern.endswith("*") and module == pattern[:-1])
               for pattern in patterns):
            return package, number, name
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    retriever_from = next(number for number, (name, _) in enumerate(LAYERS["ragr1_verl"]) if name == RETRIEVER_FROM)
    wrong = []
    for module, targets in sorted(graph.items()):
        package, number, name = layer_of(module)
        for target in sorted(targets):
            target_package, target_number, target_name = layer_of(target)
            if target_package != package:
                if package == "retriever_server" or number < retriever_from:
                    wrong.append(f"{module} ({name}) imports {target}: another package")
            elif target_number > number:
                wrong.append(f"{module} ({name}) imports {target} ({target_name}), a higher layer")
    return wrong


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(our_modules())


def test_every_module_has_a_layer(graph):
    assert [module for module in sorted(graph) if layer_of(module) is None] == []


def test_no_import_reaches_up_a_layer_or_across_to_the_retriever(graph):
    assert upward_imports(graph) == []


def test_no_modules_import_each_other_in_a_cycle(graph):
    assert cycles(graph) == []


ENVIRONMENT_MODULES = ("ragr1_verl.environment", "retriever_server.environment")


def test_the_environment_is_read_in_one_module_per_package():
    """No module but the two environment modules names a ``RAGR1_*`` variable in code (docstrings aside)."""
    named = []
    for module, path in our_modules().items():
        if module in ENVIRONMENT_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            strings = [node.value] if isinstance(node, ast.Constant) and isinstance(node.value, str) else []
            strings += [node.arg] if isinstance(node, ast.keyword) and node.arg else []
            named += [f"{module}: {text}" for text in strings if re.fullmatch(r"RAGR1_[A-Z0-9_]+", text)]
    assert named == []


def test_the_checks_see_function_local_and_relative_imports(tmp_path):
    """The graph builder on a package written here: the checks above are only as good as what it sees."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from pkg import high\n    return high\n")
    (package / "high.py").write_text("from . import low\nimport pkg.low as again\n")
    modules = {"pkg": package / "__init__.py", "pkg.low": package / "low.py", "pkg.high": package / "high.py"}
    graph = import_graph(modules)
    assert graph == {"pkg": set(), "pkg.low": {"pkg", "pkg.high"}, "pkg.high": {"pkg", "pkg.low"}}
    assert cycles(graph) == [["pkg.high", "pkg.low"]]


def test_an_upward_import_and_a_retriever_import_are_named():
    graph = {"ragr1_verl.protocol.actions": {"ragr1_verl.agent_loop"}, "ragr1_verl.agent_loop": set(),
             "ragr1_verl.reward": {"retriever_server.demo"}, "retriever_server.demo": {"ragr1_verl.reward"}}
    assert upward_imports(graph) == [
        "ragr1_verl.protocol.actions (protocol and the retrieval client (pure, no verl)) imports "
        "ragr1_verl.agent_loop (rollout, training data, SFT, the CPU port), a higher layer",
        "ragr1_verl.reward (settings, the verl seam, the reward, the LLM client) imports retriever_server.demo: "
        "another package",
        "retriever_server.demo (entry points and the demo index) imports ragr1_verl.reward: another package"]
