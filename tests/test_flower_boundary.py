"""One Flower boundary: only ``fedgpu/flower/internals/`` reaches past Flower's public API.

Every other module of fedgpu imports Flower's public packages only
(``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp`` and their subpackages,
``flwr.simulation``, and the names ``flwr.common`` exports in ``__all__``),
imports inside functions included. Inside the boundary, every Flower name
imported is listed in ``fedgpu.flower.internals.contract.FLOWER_NAMES``, the
list the contract test (tests/test_pace.py) imports against the installed Flower.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import flwr.common

from fedgpu.flower.internals.contract import FLOWER_NAMES

FEDGPU = Path(__file__).resolve().parent.parent / "fedgpu"
BOUNDARY = FEDGPU / "flower" / "internals"
PUBLIC_PACKAGES = ("flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.simulation")


def flower_imports(source: str) -> list[tuple[int, str, str | None]]:
    """(line, module, name or None) of every Flower import in ``source``, wherever it is, and of
    ``importlib.import_module("flwr...")`` calls."""
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names if _is_flower(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_flower(node.module):
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif (isinstance(node, ast.Call)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and _is_flower(str(node.args[0].value))):
            found.append((node.lineno, str(node.args[0].value), None))
    return found


def _is_flower(module: str) -> bool:
    return module == "flwr" or module.startswith("flwr.")


def is_public(module: str, name: str | None) -> bool:
    """Whether ``from module import name`` (``import module`` for None) stays on Flower's public API."""
    if module == "flwr.common":
        return name is not None and name in flwr.common.__all__
    for package in PUBLIC_PACKAGES:
        if module == package:
            return True
        if module.startswith(package + "."):
            # A subpackage (flwr.serverapp.strategy) is public; a module of one (flwr.clientapp.utils) is not.
            return hasattr(importlib.import_module(module), "__path__")
    return False


def offenders(root: Path, skip: Path | None = None) -> list[str]:
    """``path:line: import`` for every non-public Flower import under ``root`` (``skip`` excluded)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if skip is not None and skip in path.parents:
            continue
        for line, module, name in flower_imports(path.read_text()):
            if not is_public(module, name):
                what = f"from {module} import {name}" if name else f"import {module}"
                found.append(f"{path.relative_to(root.parent)}:{line}: {what}")
    return found


def test_only_the_boundary_package_imports_non_public_flower_modules() -> None:
    found = offenders(FEDGPU, skip=BOUNDARY)
    assert found == [], "non-public Flower imports outside fedgpu/flower/internals/:\n" + "\n".join(found)


def test_the_check_names_what_it_finds(tmp_path: Path) -> None:
    """The walk sees imports inside functions, private modules, private names of flwr.common, import_module."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "mod.py").write_text(
        "from flwr.app import Message\n"
        "from flwr.common import log, Context\n"
        "from flwr.serverapp.strategy import FedAvg\n"
        "def f():\n"
        "    from flwr.supercore.exit import add_exit_handler\n"
        "    from flwr.common.constant import ErrorCode\n"
        "    from flwr.common import logger\n"
        "    import flwr.clientapp.utils\n"
        "    importlib.import_module('flwr.superlink.cli.flower_superlink')\n"
    )
    assert offenders(package) == [
        "pkg/mod.py:5: from flwr.supercore.exit import add_exit_handler",
        "pkg/mod.py:6: from flwr.common.constant import ErrorCode",
        "pkg/mod.py:7: from flwr.common import logger",
        "pkg/mod.py:8: import flwr.clientapp.utils",
        "pkg/mod.py:9: import flwr.superlink.cli.flower_superlink",
    ]


def test_the_contract_lists_every_flower_name_the_boundary_imports() -> None:
    """One list of what the boundary uses: a name imported but not listed escapes the contract test."""
    listed = set(FLOWER_NAMES)
    unlisted = []
    for path in sorted(BOUNDARY.glob("*.py")):
        for line, module, name in flower_imports(path.read_text()):
            if (module, name) not in listed and not is_public(module, name) and module != "flwr":
                unlisted.append(f"{path.name}:{line}: {module} {name or ''}".rstrip())
    assert unlisted == [], "add to fedgpu.flower.internals.contract.FLOWER_NAMES:\n" + "\n".join(unlisted)
