"""One reply pace: only Flower's own grid polls for replies, paced in one place (fedgpu.flower.internals).

fedgpu once had a second polling loop of its own (a Grid subclass in server_app.py with a fixed 0.2 s
pull), so that its own tasks and users' apps ran at different paces. These checks fail if any module
outside the boundary package grows one again: a Grid of its own, a ``send_and_receive`` of its own, or
its own calls to ``pull_messages``.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "fedgpu"
BOUNDARY = PACKAGE / "flower" / "internals"


def _modules_outside_the_boundary() -> list[Path]:
    return [path for path in sorted(PACKAGE.rglob("*.py")) if BOUNDARY not in path.parents]


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def polling_of_its_own(source: str) -> list[str]:
    """What in ``source`` polls for replies itself: Grid subclasses, send_and_receive, pull_messages calls."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and any(_base_name(base).endswith("Grid") for base in node.bases):
            found.append(f"line {node.lineno}: class {node.name} subclasses a Grid")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "send_and_receive":
            found.append(f"line {node.lineno}: defines send_and_receive")
        elif isinstance(node, ast.Call) and _base_name(node.func) == "pull_messages":
            found.append(f"line {node.lineno}: calls pull_messages")
    return found


def test_the_check_finds_a_polling_loop_of_its_own() -> None:
    second_loop = '''
from flwr.serverapp import Grid
class PromptGrid(Grid):
    def send_and_receive(self, messages, timeout=None):
        while True:
            replies = self._grid.pull_messages(ids)
'''
    assert polling_of_its_own(second_loop) == [
        "line 3: class PromptGrid subclasses a Grid",
        "line 4: defines send_and_receive",
        "line 6: calls pull_messages",
    ]


def test_no_module_outside_the_boundary_polls_for_replies_itself() -> None:
    modules = _modules_outside_the_boundary()
    assert PACKAGE / "flower" / "server_app.py" in modules  # fedgpu's own ServerApp is among those checked
    found = {str(path.relative_to(ROOT)): polling_of_its_own(path.read_text()) for path in modules}
    assert {path: lines for path, lines in found.items() if lines} == {}
