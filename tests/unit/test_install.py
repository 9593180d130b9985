"""install.py installs only missing, pinned, non-webui packages, through the webui's launch module."""
import runpy
import sys
import types
from pathlib import Path

from lib_tune import requirements

REPO = Path(__file__).resolve().parents[2]


def test_missing_only_returns_uninstalled():
    reqs = [("a", "a==1.0"), ("b", "b==2.0")]
    assert requirements.missing(reqs, lambda name: name == "a") == ["b==2.0"]


def test_requirements_are_pinned_and_never_webui_packages():
    for name, spec in requirements.REQUIREMENTS:
        assert "==" in spec, f"{spec} is not pinned"
        assert name.lower() not in requirements.WEBUI_PINNED, f"{name} is the webui's to install"


def test_install_py_calls_run_pip_only_for_missing(monkeypatch):
    calls = []
    fake = types.ModuleType("launch")
    fake.is_installed = lambda name: False
    fake.run_pip = lambda args, desc=None: calls.append(args)
    monkeypatch.setitem(sys.modules, "launch", fake)
    monkeypatch.setattr(requirements, "REQUIREMENTS", [("tune-fake-dep", "tune-fake-dep==1.2.3")])
    runpy.run_path(str(REPO / "install.py"))
    assert calls == ["install tune-fake-dep==1.2.3"]
    calls.clear()
    fake.is_installed = lambda name: True
    runpy.run_path(str(REPO / "install.py"))
    assert calls == []
