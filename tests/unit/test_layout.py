"""The layers stay visible: only lib_tune.webui and lib_tune.ui import the webui's `modules`, and the rest of
lib_tune imports without a webui."""
import ast
import importlib
import pkgutil
from pathlib import Path

import lib_tune

ROOT = Path(lib_tune.__file__).parent
WEBUI_FACING = {"webui", "ui"}


def _imports_modules(path: Path) -> bool:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "modules" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "modules":
            return True
    return False


def test_only_webui_facing_packages_import_modules():
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if p.relative_to(ROOT).parts[0] not in WEBUI_FACING and _imports_modules(p)]
    assert not offenders, offenders


def test_engine_imports_without_webui():
    names = [m.name for m in pkgutil.walk_packages([str(ROOT)], "lib_tune.")
             if m.name.split(".")[1] not in WEBUI_FACING]
    for name in names:
        importlib.import_module(name)
    assert "modules" not in __import__("sys").modules or not hasattr(__import__("sys").modules["modules"], "shared")
