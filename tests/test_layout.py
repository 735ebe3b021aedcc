"""The layout holds: the device side never imports the coordinator or torch, layers import downwards, no cycles.

Imports are read with `ast` from every module, including imports inside functions (a lazy
import still runs on a board). A module's layer is its folder: see docs/architecture.md.
"""
import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("edge_runtime", "coordinator")
# edge_runtime, lowest first: a module may import its own layer and the layers below it
DEVICE_LAYERS = ["edge_runtime", "edge_runtime.wire", "edge_runtime.train", "edge_runtime.jobs",
                 "edge_runtime.device", "edge_runtime.profiling"]
# where a coordinator module may look (besides edge_runtime and its own folder)
COORDINATOR_MAY_IMPORT = {
    "coordinator.model": set(),
    "coordinator.strategies": set(),
    "coordinator": {"coordinator.model", "coordinator.strategies", "coordinator.observe", "coordinator.ops",
                    "coordinator.local"},
    "coordinator.observe": {"coordinator", "coordinator.strategies"},
    "coordinator.ops": {"coordinator", "coordinator.strategies"},
    "coordinator.local": {"coordinator", "coordinator.model", "coordinator.strategies", "coordinator.observe",
                          "coordinator.ops"},
}
TORCH_ONLY_IN = "coordinator.model"


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path) -> set[str]:
    """Every module `name` imports, absolute, at any depth of its code."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def folder(name: str, known: dict) -> str:
    """The package a module lives in (a package is its own folder)."""
    return name if known[name].name == "__init__.py" else name.rpartition(".")[0]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {i for i in imports_of(name, path) if i in known} for name, path in known.items()}


def test_the_device_side_never_imports_the_coordinator_or_torch():
    known = modules()
    bad = [(name, i) for name, path in known.items() if name.startswith("edge_runtime")
           for i in imports_of(name, path) if i.split(".")[0] in ("coordinator", "torch")]
    assert not bad, bad


def test_torch_is_imported_only_where_models_are_defined():
    known = modules()
    bad = [name for name, path in known.items() if "torch" in {i.split(".")[0] for i in imports_of(name, path)}
           and not name.startswith(TORCH_ONLY_IN)]
    assert not bad, bad


def test_device_layers_import_only_downwards():
    known, edges = modules(), graph()
    bad = []
    for name, targets in edges.items():
        if not name.startswith("edge_runtime"):
            continue
        mine = DEVICE_LAYERS.index(folder(name, known))
        for target in targets:
            if target in DEVICE_LAYERS and known[target].name == "__init__.py" and target != folder(name, known):
                theirs = DEVICE_LAYERS.index(target)     # `from edge_runtime.jobs import budget` names the package
            else:
                theirs = DEVICE_LAYERS.index(folder(target, known))
            if theirs > mine:
                bad.append(f"{name} -> {target}")
    assert not bad, bad


def test_coordinator_folders_import_only_what_their_layer_may():
    known, edges = modules(), graph()
    bad = []
    for name, targets in edges.items():
        if not name.startswith("coordinator"):
            continue
        mine = folder(name, known)
        allowed = COORDINATOR_MAY_IMPORT[mine] | {mine}
        for target in targets:
            if target.startswith("coordinator") and folder(target, known) not in allowed \
                    and target not in allowed:
                bad.append(f"{name} -> {target}")
    assert not bad, bad


def test_there_is_no_import_cycle():
    edges = graph()
    # a package importing its own modules is how Python loads it, not a cycle between concepts
    edges = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in edges.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_wheel_lists_every_package_of_the_tree():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert on_disk <= listed, sorted(on_disk - listed)
    assert listed - on_disk == {"edge_runtime.device.profiles"}   # profiles/, mapped into the device package


def test_a_wheel_install_finds_its_tiers_and_templates(tmp_path):
    """What a wheel installs runs as a checkout does: the tier files and the template files are in it."""
    import subprocess
    import sys
    import zipfile

    from coordinator.ops.wheels import project_wheel
    wheel = project_wheel(tmp_path / "wheel")
    names = set(zipfile.ZipFile(wheel).namelist())
    tiers = sorted(p.name for p in (REPO / "profiles").glob("*.toml"))
    assert tiers and {f"edge_runtime/device/profiles/{t}" for t in tiers} <= names
    for package in ("ops", "observe"):
        shipped = {p.name for p in (REPO / "coordinator" / package / "templates").iterdir()}
        assert shipped and {f"coordinator/{package}/templates/{t}" for t in shipped} <= names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # -S: no site-packages, so the checkout's editable install cannot answer instead of the wheel
    code = ("from edge_runtime.device.tiers import DEFAULT_PROFILES_DIR, find_tier; print(DEFAULT_PROFILES_DIR); "
            "print(find_tier('generic-256mb').name)")
    out = subprocess.run([sys.executable, "-S", "-c", code], env={"PYTHONPATH": str(site)}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    where, name = out.stdout.split()
    assert Path(where) == site / "edge_runtime" / "device" / "profiles" and name == "generic-256mb"
