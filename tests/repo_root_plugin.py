"""A pytest plugin (loaded by pyproject's addopts): the repository root is collected as a plain directory.

The root is the pack itself, so it holds an `__init__.py` (ComfyUI imports it). pytest would make it a Package and
import that file, which fails when the clone's folder name is no Python identifier (`ComfyUI-Letterpress`, as users
clone it into custom_nodes/): its relative imports then have no parent package. Nothing in it is a test."""

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path, parent):
    if (path / "pyproject.toml").is_file() and (path / "__init__.py").is_file() and (path / "tests").is_dir():
        return pytest.Dir.from_parent(parent, path=path)
    return None
