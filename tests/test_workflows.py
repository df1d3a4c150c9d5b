"""Every shipped API workflow checked against the pack's node definitions, on a models tree that holds the
files the workflows name (the tiny models, saved under the names users have)."""

from __future__ import annotations

import glob
import json
import os

import pytest
from letterpress.runner import Runner, load_workflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API = sorted(glob.glob(os.path.join(ROOT, "workflows", "*_api.json")))


def test_every_family_has_a_shipped_api_workflow():
    names = " ".join(os.path.basename(p) for p in API)
    for family in ("ernie_image", "ovis_image", "glm_image", "ernie_vl", "text_best_of_4"):
        assert family in names


@pytest.mark.parametrize("path", API, ids=[os.path.basename(p) for p in API])
def test_api_workflow_is_valid_for_the_pack(shipped_models, path):
    wf = load_workflow(path)
    order = Runner().validate(wf)  # node types, required inputs, links and their types, ranges, combo files
    assert set(order) <= set(wf) and order
    for node in wf.values():
        assert node.get("_meta", {}).get("title"), f"{node['class_type']} has no title"
    json.dumps(wf)
