"""The shipped GLM-Image API workflows run through the headless runner (CLI) on the tiny model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from letterpress import cli
from letterpress.runner import load_workflow

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(ROOT, "workflows", "api")


def write_inputs(workflow: dict, folder) -> None:
    """A PNG for every LoadImage of the workflow, of different sizes (64x64, 64x96, ...)."""
    os.makedirs(folder, exist_ok=True)
    loads = [n for n in workflow.values() if n["class_type"] == "LoadImage"]
    for i, node in enumerate(loads):
        rng = np.random.RandomState(i)
        small = rng.randint(0, 255, (4, 4 + 2 * i, 3)).astype(np.uint8)
        Image.fromarray(small).resize((64 + 32 * i, 64), Image.BILINEAR).save(os.path.join(folder, node["inputs"]["image"]))


@pytest.mark.parametrize("workflow,width", [("glm_image_t2i_api.json", 96), ("glm_image_edit_api.json", 64),
                                            ("glm_image_multi_subject_api.json", 96)])
def test_shipped_glm_workflow_runs_headless(glm, models_dir, tmp_path, capsys, workflow, width):
    path = os.path.join(WORKFLOWS, workflow)
    wf = load_workflow(path)
    write_inputs(wf, tmp_path / "input")
    refs = sum(n["class_type"] == "LoadImage" for n in wf.values())
    args = ["run", path, "--models-dir", models_dir, "--output-dir", str(tmp_path / "out"),
            "--input-dir", str(tmp_path / "input"), "--quiet", "--set", f"width={width}", "--set", "height=64",
            "--set", "steps=2", "--set", 'prompt=a red dog with a sign that says "open"']
    assert cli.main(args) == 0
    written = [p for p in capsys.readouterr().out.split() if str(tmp_path / "out") in p]
    assert len(written) == 1
    img = Image.open(written[0])
    assert img.size == (width, 64)
    assert np.asarray(img).std() > 1  # a picture, not a flat fill
    embedded = json.loads(img.text["prompt"])
    ar = [n for n in embedded.values() if n["class_type"] == "LetterpressGlmImageARTokens"]
    assert ar[0]["inputs"]["prompt"] == 'a red dog with a sign that says "open"'
    assert sum(k.startswith("reference_") for k in ar[0]["inputs"]) == refs
