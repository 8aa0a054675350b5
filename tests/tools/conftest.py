"""Shared by the tools/ tests: import a tool as a module (tiny model settings, phantom data and
random weights are in tests/conftest.py)."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def tool():
    """``tool(name)`` imports ``tools/<name>.py`` as a module (tools/ is not a package)."""

    def load(name):
        path = os.path.join(REPO, "tools", f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"thyroid_det_tool_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
