"""The shipped ERNIE-VL API workflows through the headless runner on the tiny models."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from letterpress import cli
from letterpress.runner import Runner, load_workflow, set_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(ROOT, "workflows", "api")
I2P = os.path.join(WORKFLOWS, "ernie_vl_image_to_prompt_to_image_api.json")
GROUND = os.path.join(WORKFLOWS, "ernie_vl_grounding_api.json")
SMALL = ["width=32", "height=32", "steps=2", "3.max_new_tokens=8"]


def write_input(folder, seed, name="example.png", size=(72, 56)):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(os.path.join(folder, name))


def run_cli(workflow, models_dir, tmp_path, *sets):
    args = ["run", workflow, "--models-dir", models_dir, "--output-dir", str(tmp_path / "out"),
            "--input-dir", str(tmp_path / "in"), "--quiet"]
    for s in sets:
        args += ["--set", s]
    return cli.main(args)


def test_image_to_prompt_to_image_runs_headless(ernie, ernie_vl, models_dir, tmp_path, capsys):
    write_input(tmp_path / "in", 0)
    assert run_cli(I2P, models_dir, tmp_path, *SMALL) == 0
    written = capsys.readouterr().out.split()
    assert len(written) == 1 and Image.open(written[0]).size == (32, 32)


def test_the_image_decides_the_prompt_and_the_picture(ernie, ernie_vl, host):
    """The VL answer is the prompt the ERNIE-Image text encoder gets: another input image, another picture."""
    wf = set_values(load_workflow(I2P), SMALL)
    runner = Runner()
    out = []
    for seed in (1, 2):
        write_input(host.input_dir, seed, name=f"in{seed}.png")
        res = runner.run(set_values(wf, [f"image=in{seed}.png"]))["results"]
        out.append((res["3"][0], res["9"][0]))
    (prompt_a, img_a), (prompt_b, img_b) = out
    assert prompt_a and prompt_b and prompt_a != prompt_b
    assert (img_a - img_b).abs().max() > 0.05


def test_grounding_workflow_runs_headless(ernie_vl, models_dir, tmp_path, capsys, host):
    write_input(tmp_path / "in", 3)
    assert run_cli(GROUND, models_dir, tmp_path, "max_new_tokens=8") == 0
    written = capsys.readouterr().out.split()
    assert len(written) == 1 and Image.open(written[0]).size == (72, 56)

    write_input(host.input_dir, 3)
    res = Runner().run(set_values(load_workflow(GROUND), ["max_new_tokens=8"]))["results"]
    boxes = json.loads(res["3"][0])
    assert (boxes["width"], boxes["height"]) == (72, 56)
    drawn, original = res["4"][0], res["1"][0]
    assert drawn.shape == original.shape
    assert bool((drawn != original).any()) == bool(boxes["boxes"])  # pixels change exactly when boxes were found
