"""The import graph of the installed ``edgec`` package has no cycles: imports only go one way, so a module
can be read, tested and moved knowing only what it imports.

The graph is read from the source (every ``import`` statement, those inside functions too: a lazy import
hides a cycle, it does not remove it), with the folders mapped to package names as pyproject.toml's
``[tool.setuptools.package-dir]`` maps them (``pipeline/`` is ``edgec.pipeline`` ...).
"""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]



def package_modules() -> dict[str, tuple[Path, bool]]:
    """``{module name: (file, is a package's __init__)}`` for every module of the package."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = setuptools["package-dir"]
    out = {}
    for package in setuptools["packages"]:
        top = next(p for p in sorted(dirs, key=len, reverse=True) if package == p or package.startswith(p + "."))
        folder = ROOT / dirs[top] / Path(*package[len(top):].split(".")[1:])
        for f in folder.glob("*.py"):
            is_init = f.stem == "__init__"
            out[package if is_init else f"{package}.{f.stem}"] = (f, is_init)
    return out


def _owner(name: str, modules) -> str | None:
    """The module of ours that ``name`` (a module or a name inside one) belongs to."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules) -> dict[str, set[str]]:
    graph = {}
    for name, (path, is_init) in modules.items():
        here = name if is_init else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(_owner(a.name, modules) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:  # ``from pkg import submodule`` imports the submodule
                    targets.add(_owner(f"{base}.{a.name}", modules) if f"{base}.{a.name}" in modules
                                else _owner(base, modules))
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(component)
    return out


def test_the_graph_is_read_from_every_module():
    modules = package_modules()
    graph = import_graph(modules)
    assert {"edgec.cli", "edgec.ondevice.manifest", "edgec.search.runner", "edgec.pipeline.stages.export",
            "edgec.targets.tflite_export", "edgec.calibration.readers"} <= set(graph)
    # relative, absolute, lazy and ``from . import submodule`` imports are all edges
    assert "edgec.ondevice.integrity" in graph["edgec.ondevice.manifest"]
    assert "edgec.search.ray_backend" in graph["edgec.search.runner"]
    assert "edgec.base.errors" in graph["edgec.search.runner"]


def test_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [{"a", "b", "c"}]


def test_no_import_cycle():
    """The redesign (issue 23) broke the last ones: qat <-> tflite_export, objectives <-> training,
    search runner <-> ray_backend, ondevice manifest <-> tasks, artifact <-> cache, data_fetch -> config."""
    found = cycles(import_graph(package_modules()))
    assert not found, f"import cycles: {[sorted(c) for c in found]}"


# The layers, top to bottom: a module imports from its own layer and the ones below, never above.
# ``edgec.ondevice`` (the numpy-only runner shipped in every bundle) and ``edgec.calibration`` sit beside
# the base; the root package ``edgec`` holds only the version. ``edgec.zoo`` and ``edgec.modules`` are
# base modules that keep their path: an exported model records its layers' class paths in its tensor
# names (``edgec.zoo.CNNSmall/...``), so moving them would change every bundle.
BASE_AT_THE_TOP_LEVEL = ("edgec.zoo", "edgec.modules")
LAYERS = [
    ("top", lambda m: True),  # edgec.cli, api, config, report, search, ...: whatever is not below
    ("pipeline and targets", lambda m: m.startswith(("edgec.pipeline", "edgec.targets"))),
    ("base", lambda m: m in ("edgec", *BASE_AT_THE_TOP_LEVEL)
     or m.startswith(("edgec.base", "edgec.ondevice", "edgec.calibration"))),
]


def layer_of(module: str) -> int:
    return max(i for i, (_, member) in enumerate(LAYERS) if member(module))


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
                  for m, targets in graph.items() for t in targets if layer_of(t) < layer_of(m))


def test_layers_are_found():
    graph = {"edgec.base.data": {"edgec.pipeline.cache_auth"}, "edgec.pipeline.runner": {"edgec.api", "edgec.base.errors"},
             "edgec.cli": {"edgec.pipeline.runner", "edgec.base.errors"}, "edgec.targets.qat": {"edgec.pipeline.stage"}}
    assert upward_imports(graph) == [
        "edgec.base.data (base) imports edgec.pipeline.cache_auth (pipeline and targets)",
        "edgec.pipeline.runner (pipeline and targets) imports edgec.api (top)",
    ]


# Still going up: a stage's optional report section (the stage protocol's ``report_section``) renders
# with the report package's section code, imported lazily when the report is written.
REPORT_SECTION_HOOKS = {
    "edgec.pipeline.stages.learn (pipeline and targets) imports edgec.report.continual (top)",
    "edgec.pipeline.stages.pretrain (pipeline and targets) imports edgec.report.pretrain (top)",
    "edgec.pipeline.stages.share (pipeline and targets) imports edgec.report.sections (top)",
}


def test_imports_only_go_down():
    """Issue 23: edgec was both the top (cli, api, config, report) and the bottom (errors, data,
    architecture, checkpoint, zoo) of the graph; the bottom is edgec.base now, below the pipeline,
    and nothing in it imports from the pipeline, the targets or the top."""
    modules = package_modules()
    assert {"edgec.base.errors", "edgec.base.data", "edgec.zoo"} <= set(modules)
    found = upward_imports(import_graph(modules))
    assert not [f for f in found if f.startswith(("edgec.base", "edgec.ondevice", *BASE_AT_THE_TOP_LEVEL))], "\n".join(found)
    assert set(found) <= REPORT_SECTION_HOOKS, "imports that go up a layer:\n" + "\n".join(sorted(set(found) - REPORT_SECTION_HOOKS))


def missing_modules(modules) -> list[str]:
    """``file: name`` for each import of an edgec module that does not exist (a move left it behind)."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    existing = set(modules) | set(packages)  # a package may have no __init__.py
    missing = []
    for name, (path, is_init) in modules.items():
        here = name if is_init else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                wanted = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                wanted = [base]
            else:
                continue
            missing += [f"{path.relative_to(ROOT)}: {w}" for w in wanted
                        if (w == "edgec" or w.startswith("edgec.")) and w not in existing]
    return missing


def test_every_edgec_import_names_a_module_that_exists():
    assert missing_modules(package_modules()) == []
