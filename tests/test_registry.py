"""pyproject.toml as ComfyUI's registry reads it: ComfyUI 0.33.0's own parser (comfy_config/config_parser.py, which
mirrors comfy-cli's) run on the clone, and the rules of the registry's specification that the parser leaves out."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI = os.path.join(os.path.dirname(ROOT), "shared", "comfyui", "0.33.0")
READ = ("import json, sys; from comfy_config import config_parser; "
        "print(json.dumps(config_parser.extract_node_configuration(sys.argv[1]).model_dump()))")


@pytest.mark.skipif(not os.path.isdir(os.path.join(COMFYUI, "comfy_config")), reason="no ComfyUI 0.33.0 tree beside the clone")
def test_comfyui_reads_the_registry_metadata():
    out = subprocess.run([sys.executable, "-c", READ, ROOT], cwd=COMFYUI, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    project, comfy = config["project"], config["tool_comfy"]
    # the registry's rules for the node id and version (docs.comfy.org/registry/specifications)
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", project["name"]) and len(project["name"]) < 100
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["license"]["text"] and project["description"]
    # the parser drops a classifier list with any value it does not know: both lists read back whole
    assert project["supported_os"] == ["OS Independent"]
    assert project["supported_accelerators"] == ["GPU :: NVIDIA CUDA"]
    assert project["supported_comfyui_version"] == ">=0.3.64"
    assert comfy["publisher_id"] and comfy["display_name"] == "ComfyUI-Letterpress"
