"""Session fixtures: tiny random models in a ComfyUI-like models/ tree, and a standalone host on it."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # `fixtures` package

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


def _standalone(models_dir, out_dir):
    from letterpress.loaders.host import StandaloneHost, set_host

    h = StandaloneHost()
    h.models_dir = models_dir
    h.output_dir = os.path.join(out_dir, "output")
    h.input_dir = os.path.join(out_dir, "input")
    h.show_progress = False
    set_host(h)
    return h


@pytest.fixture(scope="session", autouse=True)
def session_host(models_dir, tmp_path_factory):
    """The host that module- and session-scoped fixtures load models through."""
    return _standalone(models_dir, str(tmp_path_factory.mktemp("session")))


@pytest.fixture(autouse=True)
def host(models_dir, tmp_path, session_host):
    """A fresh standalone host for each test, reading the session's models, writing to the test's tmp;
    the session host is put back afterwards, for the module fixtures that load next."""
    from letterpress.loaders.host import set_host

    yield _standalone(models_dir, str(tmp_path))
    set_host(session_host)


@pytest.fixture(scope="session")
def ernie(models_dir):
    """The tiny ERNIE-Image components (the same weights the files on disk hold)."""
    from fixtures import ernie_image

    return ernie_image.build(models_dir)


@pytest.fixture(scope="session")
def ovis(models_dir):
    """The tiny Ovis-Image (models/diffusers/Ovis-Image-7B and the single files) and its components."""
    from fixtures import ovis_image

    return ovis_image.build(models_dir)


@pytest.fixture(scope="session")
def glm(models_dir):
    """The tiny GLM-Image (diffusers layout under models/diffusers/GLM-Image) and its components."""
    from fixtures import glm_image

    return glm_image.build(models_dir)


@pytest.fixture(scope="session")
def ernie_vl(models_dir):
    """The tiny ERNIE-4.5-VL (transformers layout under models/LLM/ERNIE-4.5-VL-28B-A3B-PT and -Thinking)."""
    from fixtures import ernie_vl as build_vl

    return build_vl.build(models_dir)


@pytest.fixture(scope="session")
def shipped_models(ernie, ovis, glm, ernie_vl, models_dir):
    """Every family's tiny model, plus a LoRA under the name the LoRA workflow uses and the GGUF workflow's DiT."""
    from fixtures.common import shipped_extras

    shipped_extras(ernie, models_dir)
    return models_dir


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (use with `pytestmark = pytest.mark.usefixtures("one_thread")`):
    toy-sized matmuls gain nothing from a second thread, a busy shared CPU makes the thread handoff in every
    attention call cost milliseconds, and a fresh process a test starts runs with the same count (CPU matmuls
    may sum in another order with another)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def glm_models(glm, session_host):
    """The tiny GLM-Image's four stages, from the folder loader (once per test module)."""
    from letterpress.nodes import NODE_CLASS_MAPPINGS

    ar, glyph, dit, vae = NODE_CLASS_MAPPINGS["LetterpressGlmImageFolderLoader"]().run("GLM-Image", "auto")
    return dict(ar=ar, glyph=glyph, dit=dit, vae=vae)
