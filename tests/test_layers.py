"""The layers point one way: read every module's imports (inside functions too) and check the arrows.

The isolation core knows nothing of Flower, GPUs, reports or tasks; GPU
placement, reports and tasks know nothing of Flower; the ServerApp knows
nothing of the launcher; ``fedgpu bench-models`` does not reach into the
Flower layer. Static: the source is read with ``ast``, nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedgpu"

# Below the isolation core: modules that import nothing of fedgpu but each other (checked below).
LEAVES = ("fedgpu.errors", "fedgpu.names", "fedgpu.private_dirs")
HEAVY = ("flwr", "torch", "torchvision", "pynvml")  # third-party packages the isolation core never imports


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, imported name) for every import in ``source``, at any depth; relative ones made absolute.

    ``from a import b`` yields ``a.b``: ``b`` may be a module, and a prefix
    check on ``a.b`` is a check on ``a`` too.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def all_imports() -> dict[str, list[tuple[str, int, str]]]:
    """module -> [(file, line, imported name)] for every module of fedgpu."""
    table: dict[str, list[tuple[str, int, str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        where = str(path.relative_to(PACKAGE.parent))
        found = imports_of(path.read_text(), module, path.name == "__init__.py")
        table[module] = [(where, line, name) for line, name in found]
    return table


IMPORTS = all_imports()


def offences(modules: tuple[str, ...], forbidden) -> list[str]:
    """``module (file:line) imports name`` for each import of ``modules`` that ``forbidden(name)`` refuses."""
    return [
        f"{module} ({where}:{line}) imports {name}"
        for module, found in IMPORTS.items()
        if any(within(module, top) for top in modules)
        for where, line, name in found
        if forbidden(name)
    ]


def test_the_scan_sees_nested_and_relative_imports() -> None:
    source = (
        "import os\n"
        "from . import wire\n"
        "from ..nvml.measure import gpu_peak_bytes\n"
        "def f():\n"
        "    if True:\n"
        "        from fedgpu.flower import children\n"
        "class C:\n"
        "    def g(self):\n"
        "        import flwr.app\n"
    )
    names = [name for _, name in imports_of(source, "fedgpu.isolation.core")]
    assert names == [
        "os", "fedgpu.isolation.wire", "fedgpu.nvml.measure.gpu_peak_bytes", "fedgpu.flower.children", "flwr.app",
    ]
    assert [name for _, name in imports_of("from .zygote import caller\n", "fedgpu.isolation", True)] == [
        "fedgpu.isolation.zygote.caller"
    ]
    # Every package is read, and the rules below have modules to judge.
    assert {"fedgpu.isolation.core", "fedgpu.isolation.zygote.server", "fedgpu.nvml.measure", "fedgpu.monitor.report",
            "fedgpu.tasks.digits", "fedgpu.flower.server_app", "fedgpu.bench_models"} <= set(IMPORTS)


def test_the_isolation_core_imports_only_itself_and_the_leaves() -> None:
    def forbidden(name: str) -> bool:
        if within(name, "fedgpu"):
            return not (within(name, "fedgpu.isolation") or any(within(name, leaf) for leaf in LEAVES))
        return any(within(name, heavy) for heavy in HEAVY)

    bad = offences(("fedgpu.isolation",), forbidden)
    assert not bad, "the isolation core must import of fedgpu only fedgpu.isolation and " + ", ".join(LEAVES) + \
        f" (and none of {', '.join(HEAVY)}):\n" + "\n".join(bad)


def test_the_leaves_below_the_core_import_nothing_of_fedgpu_but_each_other() -> None:
    bad = offences(LEAVES, lambda name: within(name, "fedgpu") and not any(within(name, leaf) for leaf in LEAVES))
    assert not bad, "a module the isolation core may import must import nothing else of fedgpu:\n" + "\n".join(bad)
    assert not offences(("fedgpu.names",), lambda name: True), "fedgpu.names imports nothing at all"


def test_every_environment_name_lives_in_fedgpu_names() -> None:
    """A FEDGPU_* or FLWR_* name written as a string anywhere else in fedgpu is a second home for it."""
    stray = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.value!r}"
        for path in sorted(PACKAGE.rglob("*.py")) if path.name != "names.py" or path.parent != PACKAGE
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and (node.value.startswith("FEDGPU_") or node.value.startswith("FLWR_"))
    ]
    assert not stray, "environment names belong in fedgpu/names.py:\n" + "\n".join(stray)
    keywords = [  # os.environ.update(FEDGPU_X=...) spells a name without a string
        f"{path.relative_to(PACKAGE.parent)}:{node.value.lineno} {node.arg}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.keyword) and node.arg and node.arg.startswith(("FEDGPU_", "FLWR_"))
    ]
    assert not keywords, "environment names belong in fedgpu/names.py:\n" + "\n".join(keywords)


@pytest.mark.parametrize("layer", ["fedgpu.nvml", "fedgpu.monitor", "fedgpu.tasks", "fedgpu.bench_models"])
def test_layers_below_flower_never_import_it(layer: str) -> None:
    bad = offences((layer,), lambda name: within(name, "fedgpu.flower"))
    assert not bad, f"{layer} must not import the Flower layer:\n" + "\n".join(bad)


BELOW_THE_CHECKS = ["fedgpu.isolation", "fedgpu.flower", "fedgpu.nvml", "fedgpu.monitor", "fedgpu.tasks",
                    "fedgpu.bench_models"]


@pytest.mark.parametrize("layer", BELOW_THE_CHECKS)
def test_the_option_checks_sit_on_top(layer: str) -> None:
    bad = offences((layer,), lambda name: within(name, "fedgpu.plans"))
    assert not bad, f"{layer} must not import fedgpu.plans (the checks import it):\n" + "\n".join(bad)


def test_the_server_app_never_imports_the_launcher_side() -> None:
    bad = offences(("fedgpu.flower.server_app",),
                   lambda name: within(name, "fedgpu.launch") or within(name, "fedgpu.cli"))
    assert not bad, "the ServerApp runs under Flower, not under fedgpu's launcher:\n" + "\n".join(bad)
