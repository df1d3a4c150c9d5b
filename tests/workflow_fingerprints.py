"""Fingerprints of everything every shipped API workflow computes, headless on the tiny models: for comparing the
pack before and after a change that must not change a single bit (a refactor).

    python tests/workflow_fingerprints.py OUT.json           # write the fingerprints
    python tests/workflow_fingerprints.py OUT.json --vs A.json   # and compare them with an earlier run's

Each workflow runs as tests/test_comfyui.py runs it (2 steps, 64x64, 8 new tokens) on the standalone host, with the
Remote workflows pointed at the stand-in servers; every output of every node is hashed (tensors by their bytes,
dtype and shape; text as text; files a node wrote by their bytes). The models are built from fixed seeds, so two
runs of the same code give the same fingerprints."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def _digest(value) -> object:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return f"tensor{tuple(t.shape)}:{t.dtype}:{hashlib.sha256(raw).hexdigest()[:16]}"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_digest(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _digest(v) for k, v in value.items()}
    return type(value).__name__  # model handles and other objects: their effect shows in what they compute


def _files(folder: str) -> dict[str, str]:
    """What each file a workflow wrote holds: a picture's pixels, a safetensors file's tensors (not their metadata,
    which names dates and paths)."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if not os.path.isfile(path) or path.endswith((".json", ".txt", ".log")):
            continue
        if path.endswith(".png"):
            raw = np.asarray(Image.open(path)).tobytes()
        elif path.endswith(".safetensors"):
            raw = json.dumps({k: _digest(v) for k, v in sorted(load_file(path).items())}).encode()
        else:
            raw = open(path, "rb").read()
        out[os.path.relpath(path, folder)] = hashlib.sha256(raw).hexdigest()[:16]
    return out


def fingerprints() -> dict:
    from conftest import _standalone
    from fixtures import ernie_image, ernie_vl, glm_image, ovis_image
    from fixtures.common import shipped_extras, workflow_inputs
    from fixtures.standin_servers import SGLangDiffusionStandIn, VllmOmniStandIn
    from test_comfyui import small

    from letterpress.runner import Runner, load_workflow

    torch.set_num_threads(2)
    work = tempfile.mkdtemp(prefix="fingerprints-")
    models = os.path.join(work, "models")
    os.makedirs(models)
    host = _standalone(models, work)
    ernie = ernie_image.build(models)
    ovis_image.build(models)
    glm_image.build(models)
    ernie_vl.build(models)
    shipped_extras(ernie, models)
    host.input_dir = os.path.join(work, "input")
    workflow_inputs(host.input_dir, glob.glob(os.path.join(ROOT, "workflows", "api", "*_api.json")))
    out = {}
    with SGLangDiffusionStandIn() as sglang, VllmOmniStandIn() as omni:
        remote = {"LetterpressErnieImageRemote": sglang, "LetterpressGlmImageRemote": omni}
        for path in sorted(glob.glob(os.path.join(ROOT, "workflows", "api", "*_api.json"))):
            name = os.path.basename(path)
            wf = small(load_workflow(path))
            if any(n["class_type"] == "LetterpressTextRead" for n in wf.values()):
                try:
                    import rapidocr  # noqa: F401
                except ImportError:
                    out[name] = "skipped: rapidocr not installed"
                    continue
            host.output_dir = os.path.join(work, "output", name)
            for node in wf.values():
                if node["class_type"] in remote:
                    node["inputs"]["base_url"] = remote[node["class_type"]].base_url
            torch.manual_seed(0)
            results = Runner().run(wf)["results"]
            outputs = json.loads(json.dumps({nid: _digest(results[nid]) for nid in results}).replace(work, "WORK"))
            out[name] = {"outputs": outputs,
                         "files": _files(host.output_dir)}
            print(name, "done", flush=True)
    return out


def main(argv: list[str]) -> int:
    target = argv[0]
    prints = fingerprints()
    with open(target, "w") as f:
        json.dump(prints, f, indent=1, sort_keys=True)
    if "--vs" not in argv:
        return 0
    before = json.load(open(argv[argv.index("--vs") + 1]))
    changed = sorted(k for k in set(before) | set(prints) if before.get(k) != prints.get(k))
    for name in changed:
        print("DIFFERS:", name)
    print(f"{len(prints) - len(changed)} of {len(prints)} workflows compute the same to the bit")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
