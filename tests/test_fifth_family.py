"""A fifth, made-up family added the way README's "Adding a model family" says: three new files and one line.

"Zeta-Image" is diffusers' Z-Image (ZImagePipeline: ZImageTransformer2DModel, a Qwen3 text encoder, the FLUX.1 KL
VAE, flow-match Euler). Its three files are tests/fixtures/fifth_family/{loaders,samplers,nodes}.py; the test copies
the pack (its tracked files) to tmp/letterpress_zeta/, writes them there as loaders/zeta_image.py,
samplers/zeta_image.py and nodes/zeta_image.py, adds "zeta_image" to REGISTERED in loaders/families.py, and checks
that nothing else differs. Then the copy runs, headless (`python -m letterpress_zeta run`) and inside every ComfyUI
release (POST /prompt), on a tiny random Z-Image in the diffusers layout: text-to-image equal to ZImagePipeline's
image on the same folder, a LoRA file equal to the pipeline with the LoRA merged into the DiT's weights by hand, and
a Train LoRA step whose saved file loads back (the LoRA Loader), changes the image, and reads back in diffusers
(load_lora_weights) to the same image. Inside ComfyUI the images equal the headless ones.
"""

from __future__ import annotations

import difflib
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from fixtures import zeta_image
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILY_FILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "fifth_family")
PACK, KEY, STEM = "letterpress_zeta", "zeta_image", "LetterpressZetaImage"
PARTS = ("loaders", "samplers", "nodes")
REGISTRY = os.path.join("loaders", "families.py")
SIZE, STEPS, CFG, SEED = 32, 3, 2.5, 7
PROMPT, OTHER_PROMPT = "a red poster", "neon sign that says open late"
THREADS = "1"  # every process computes with the same thread count, so the sums run in the same order


# The copy of the pack ---------------------------------------------------------------------------------------------


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    return [p for p in out.split("\0") if p and os.path.isfile(os.path.join(ROOT, p))]


def register(text: str) -> str:
    """loaders/families.py with KEY added to the one REGISTERED line."""
    line = re.search(r"^REGISTERED = \((.*?)\)", text, re.MULTILINE)
    assert line, "loaders/families.py has no one-line REGISTERED = (...) to add a family to"
    return text[:line.end(1)] + f', "{KEY}"' + text[line.end(1):]


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> str:
    """The pack with the fifth family: tmp/letterpress_zeta (a package named unlike the pack, as ComfyUI may)."""
    dest = str(tmp_path_factory.mktemp("fifth") / PACK)
    for rel in tracked_files():
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copyfile(os.path.join(ROOT, rel), os.path.join(dest, rel))
    for part in PARTS:
        shutil.copyfile(os.path.join(FAMILY_FILES, f"{part}.py"), os.path.join(dest, part, f"{KEY}.py"))
    registry = os.path.join(dest, REGISTRY)
    with open(registry) as f:
        text = register(f.read())
    with open(registry, "w") as f:
        f.write(text)
    return dest


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_the_family_is_three_new_files_and_one_line(pack):
    copied = {os.path.relpath(os.path.join(d, f), pack) for d, dirs, files in os.walk(pack) for f in files
              if "__pycache__" not in d}
    tracked = set(tracked_files())
    new = {f"{part}/{KEY}.py" for part in PARTS}
    assert copied - tracked == new and tracked == copied - new
    changed = [rel for rel in tracked if read(os.path.join(ROOT, rel)) != read(os.path.join(pack, rel))]
    assert changed == [REGISTRY]
    diff = [d for d in difflib.ndiff(read(os.path.join(ROOT, REGISTRY)).decode().splitlines(),
                                     read(os.path.join(pack, REGISTRY)).decode().splitlines()) if d[:2] in ("- ", "+ ")]
    assert len(diff) == 2 and diff[0].startswith("- REGISTERED") and diff[1].startswith("+ REGISTERED"), diff
    for part in PARTS:  # short enough to be the model README shows
        assert len(read(os.path.join(FAMILY_FILES, f"{part}.py")).decode().splitlines()) <= 150, part


# Models, inputs, workflows ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zeta(tmp_path_factory) -> dict:
    """A models/ tree with the tiny Zeta-Image folder and a LoRA file on its DiT; an input/ folder with a dataset."""
    base = tmp_path_factory.mktemp("zeta")
    models, inputs = base / "models", base / "input"
    folder = zeta_image.build(str(models))
    gen = torch.Generator().manual_seed(3)
    lora, state = {}, {}
    for layer, (rows, cols) in {"layers.0.attention.to_q": (32, 32), "layers.1.attention.to_out.0": (32, 32)}.items():
        down, up = torch.randn(2, cols, generator=gen) * 0.5, torch.randn(rows, 2, generator=gen) * 0.5
        state[f"transformer.{layer}.lora_A.weight"], state[f"transformer.{layer}.lora_B.weight"] = down, up
        lora[layer] = (down, up, 1.0)  # no alpha in the file: PEFT's scale alpha / rank is 1
    from safetensors.torch import save_file

    os.makedirs(models / "loras")
    save_file(state, str(models / "loras" / "zeta_lora.safetensors"))
    dataset = inputs / "zeta_dataset"
    dataset.mkdir(parents=True)
    for i, colour in enumerate(((200, 40, 40), (40, 40, 200))):
        Image.new("RGB", (SIZE, SIZE), colour).save(dataset / f"{i}.png")
        (dataset / f"{i}.txt").write_text(f"a sign in colour {i}")
    return dict(models=str(models), inputs=str(inputs), folder=folder, lora=lora, base=str(base))


def _draw(wf: dict, nid: int, dit: list, prompt_node: str, prefix: str) -> None:
    """Sample -> VAE Decode -> Save Image as nodes nid, nid+1, nid+2."""
    wf[str(nid)] = {"class_type": f"{STEM}Sampler", "inputs": {
        "dit": dit, "positive": [prompt_node, 0], "negative": [prompt_node, 1], "latent": ["3", 0], "seed": SEED,
        "steps": STEPS, "cfg": CFG, "denoise": 1.0}}
    wf[str(nid + 1)] = {"class_type": f"{STEM}VAEDecode", "inputs": {"vae": ["1", 2], "latent": [str(nid), 0]}}
    wf[str(nid + 2)] = {"class_type": "SaveImage", "inputs": {"images": [str(nid + 1), 0],
                                                             "filename_prefix": f"zeta/{prefix}"}}


def _base() -> dict:
    return {
        "1": {"class_type": f"{STEM}FolderLoader", "inputs": {"folder": zeta_image.FOLDER, "weight_dtype": "auto"}},
        "2": {"class_type": f"{STEM}TextEncode", "inputs": {"text_encoder": ["1", 1], "prompt": PROMPT,
                                                           "negative_prompt": ""}},
        "3": {"class_type": f"{STEM}EmptyLatent", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
    }


def first_workflow() -> dict:
    """Text-to-image (two prompts), a LoRA file, and a Train LoRA step (saved, and applied in the graph)."""
    wf = _base()
    _draw(wf, 4, ["1", 0], "2", "t2i")
    wf["10"] = {"class_type": f"{STEM}TextEncode", "inputs": {"text_encoder": ["1", 1], "prompt": OTHER_PROMPT,
                                                             "negative_prompt": ""}}
    _draw(wf, 11, ["1", 0], "10", "t2i_other")
    wf["20"] = {"class_type": f"{STEM}LoraLoader", "inputs": {"dit": ["1", 0], "lora_name": "zeta_lora.safetensors",
                                                             "strength": 0.8}}
    _draw(wf, 21, ["20", 0], "2", "lora")
    wf["30"] = {"class_type": "LetterpressTrainingDataset", "inputs": {"folder": "zeta_dataset", "repeats": 1}}
    wf["31"] = {"class_type": f"{STEM}TrainLoRA", "inputs": {
        "dit": ["1", 0], "text_encoder": ["1", 1], "vae": ["1", 2], "dataset": ["30", 0], "rank": 4, "alpha": 4.0,
        "learning_rate": 0.05, "steps": 2, "batch_size": 1, "seed": 0, "layers": "attention", "resolution": SIZE,
        "gradient_checkpointing": False}}
    wf["32"] = {"class_type": "LetterpressSaveLoRA", "inputs": {"lora": ["31", 0],
                                                               "filename_prefix": "loras/zeta_trained"}}
    wf["33"] = {"class_type": f"{STEM}ApplyTrainedLoRA", "inputs": {"dit": ["1", 0], "lora": ["31", 0],
                                                                   "strength": 1.0}}
    _draw(wf, 34, ["33", 0], "2", "trained")
    return wf


def second_workflow() -> dict:
    """The LoRA that the first workflow trained and saved, read back from its file by the LoRA Loader."""
    wf = _base()
    wf["20"] = {"class_type": f"{STEM}LoraLoader", "inputs": {"dit": ["1", 0], "strength": 1.0,
                                                             "lora_name": "zeta_trained_00001_.safetensors"}}
    _draw(wf, 21, ["20", 0], "2", "trained_file")
    return wf


OUTPUTS = {"t2i": "6", "t2i_other": "13", "lora": "23", "trained": "36"}
SECOND_OUTPUTS = {"trained_file": "23"}


def png(path: str) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def as_saved(image: np.ndarray) -> np.ndarray:
    """A float image (H, W, C) in 0..1 as Save Image writes it (255 * x, clipped, truncated to uint8)."""
    return np.clip(255.0 * image, 0, 255).astype(np.uint8).astype(int)


def assert_same_image(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Equal up to float noise: one step of 8-bit rounding at most."""
    assert got.shape == want.shape, what
    diff = np.abs(got - want)
    assert diff.max() <= 1, f"{what}: {int(diff.max())} levels apart at worst, {(diff > 1).mean():.1%} of them"


def assert_different(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert np.abs(a - b).max() > 20 and np.abs(a - b).mean() > 2, what


# Headless -----------------------------------------------------------------------------------------------------------


def environment(pack: str) -> dict:
    return {**os.environ, "PYTHONPATH": os.path.dirname(pack), "OMP_NUM_THREADS": THREADS,
            "MKL_NUM_THREADS": THREADS}


def run_headless(pack: str, zeta: dict, wf: dict, name: str) -> None:
    path = os.path.join(zeta["base"], f"{name}.json")
    with open(path, "w") as f:
        json.dump(wf, f)
    out = subprocess.run([sys.executable, "-m", PACK, "run", path, "--models-dir", zeta["models"], "--output-dir",
                          os.path.join(zeta["base"], "output"), "--input-dir", zeta["inputs"], "--device", "cpu",
                          "--quiet"], env=environment(pack), cwd=zeta["base"], capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.fixture(scope="module")
def headless(pack, zeta) -> dict:
    """Both workflows run headless by the copy; its images by output name."""
    run_headless(pack, zeta, first_workflow(), "first")
    run_headless(pack, zeta, second_workflow(), "second")
    images = {}
    for name in (*OUTPUTS, *SECOND_OUTPUTS):
        found = glob.glob(os.path.join(zeta["base"], "output", "zeta", f"{name}_00001_.png"))
        assert len(found) == 1, name
        images[name] = png(found[0])
    return images


def trained_file(zeta: dict) -> str:
    return os.path.join(zeta["base"], "output", "loras", "zeta_trained_00001_.safetensors")


def test_text_to_image_headless_equals_the_pipeline(zeta, headless):
    want = as_saved(zeta_image.reference(zeta["folder"], PROMPT, SIZE, STEPS, CFG, SEED))
    assert_same_image(headless["t2i"], want, "text-to-image")
    # the tiny DiT reads the prompt: a wrong text encoding could not pass the check above
    other = as_saved(zeta_image.reference(zeta["folder"], OTHER_PROMPT, SIZE, STEPS, CFG, SEED))
    assert_different(want, other, "another prompt draws another image")
    assert_same_image(headless["t2i_other"], other, "text-to-image, the other prompt")


def test_lora_file_headless_equals_the_merged_weights(zeta, headless):
    want = as_saved(zeta_image.reference(zeta["folder"], PROMPT, SIZE, STEPS, CFG, SEED, lora=zeta["lora"],
                                         strength=0.8))
    assert_different(want, headless["t2i"], "the LoRA changes the image")
    assert_same_image(headless["lora"], want, "LoRA file at strength 0.8")


def test_trained_lora_loads_back_and_reads_in_diffusers(zeta, headless):
    assert_different(headless["trained"], headless["t2i"], "two training steps change the image")
    assert_same_image(headless["trained_file"], headless["trained"], "the saved LoRA, loaded from its file")
    want = as_saved(zeta_image.reference(zeta["folder"], PROMPT, SIZE, STEPS, CFG, SEED,
                                         lora_file=trained_file(zeta)))
    assert_same_image(headless["trained"], want, "the saved LoRA read by diffusers' load_lora_weights")


# Inside ComfyUI -----------------------------------------------------------------------------------------------------

# The releases test_comfyui runs (COMFYUI_PATH, else every tree under ../shared/comfyui; none: a skip). A COMFYUI_PATH
# that names no ComfyUI tree fails this test as it fails those, and the headless tests above still run.
try:
    from test_comfyui import RELEASES, frontend_for, release_name
    NO_TREE = ""
except RuntimeError as e:
    NO_TREE, RELEASES, release_name = str(e), ["COMFYUI_PATH"], os.path.basename


@pytest.mark.skipif(not RELEASES, reason="no ComfyUI tree: set COMFYUI_PATH to one (or several, joined by os.pathsep)")
@pytest.mark.parametrize("release", RELEASES, ids=[release_name(p) for p in RELEASES])
def test_in_comfyui_the_images_equal_the_headless_ones(release, pack, zeta, headless, tmp_path):
    if NO_TREE:
        pytest.fail(NO_TREE)
    from prompt_api import StartError, start, view_image

    (tmp_path / "custom_nodes").mkdir()
    os.symlink(pack, tmp_path / "custom_nodes" / PACK)
    os.symlink(zeta["models"], tmp_path / "models")
    os.symlink(zeta["inputs"], tmp_path / "input")
    root, _ = frontend_for(release)
    try:
        comfy = start(release, str(tmp_path), ["--cpu", *(["--front-end-root", root] if root else [])],
                      env=environment(pack) | {"PYTHONPATH": ""})
    except StartError as e:
        pytest.fail(str(e))
    try:
        info = comfy.get("/object_info")
        ours = [n for n in info if n.startswith(STEM)]
        assert f"{STEM}Sampler" in ours and info[f"{STEM}Sampler"]["python_module"] == f"custom_nodes.{PACK}"
        for name in ours:  # the house rule for every node: a description and a tooltip on each input
            assert info[name]["description"] and info[name]["display_name"].startswith("Zeta-Image "), name
            for group in ("required", "optional"):
                for key, spec in info[name]["input"].get(group, {}).items():
                    assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{key}"
        for wf, outputs in ((first_workflow(), OUTPUTS), (second_workflow(), SECOND_OUTPUTS)):
            entry = comfy.wait(comfy.queue(wf))
            assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
            for name, node in outputs.items():
                assert_same_image(view_image(comfy, entry, node), headless[name], f"{release_name(release)}: {name}")
    finally:
        comfy.stop()
