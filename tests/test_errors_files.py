"""Damaged model files and folders: each gives one clear LetterpressError naming the file and the fix, never a
traceback from torch, safetensors or json, and nothing on disk is changed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from letterpress.loaders.errors import LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

DOWNLOAD = "[Dd]ownload it again"


def node(name):
    return N["LetterpressErnieImage" + name]()


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def split_file(path) -> tuple[dict, bytes]:
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_file(path, header, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def first_matrix(header: dict) -> str:
    return next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32" and len(v["shape"]) == 2)


def copy_folder(models_dir, tmp_path, name="ERNIE-Image"):
    folder = tmp_path / "diffusers" / name
    shutil.copytree(os.path.join(models_dir, "diffusers", name), folder)
    return folder


def dit_file(models_dir) -> str:
    return os.path.join(models_dir, "diffusion_models", "ernie-image.safetensors")


# 1. Corrupt safetensors headers ----------------------------------------------------------------


def _set(entry_key, value):
    def edit(h):
        k = first_matrix(h)
        if value is None:
            del h[k][entry_key]
        else:
            h[k][entry_key] = value(h[k]) if callable(value) else value
        return h
    return edit


HEADER_CASES = {
    "list": (lambda h: [1, 2], r"a JSON list, not an object"),
    "no_data_offsets": (_set("data_offsets", None), r"tensor \S+: data_offsets None is not \[start, end\]"),
    "metadata_not_a_map": (lambda h: {**h, "__metadata__": "oops"}, r"__metadata__ is not a map of text to text"),
    "shape_doubled": (_set("shape", lambda e: [e["shape"][0] * 2, e["shape"][1]]),
                      r"tensor \S+: F32 of shape \[\d+, \d+\] takes \d+ bytes, but its data_offsets span \d+"),
    "f32_relabelled_f64": (_set("dtype", "F64"), r"tensor \S+: F64 of shape .* takes \d+ bytes, but its data_offsets span"),
    "unknown_dtype": (_set("dtype", "X99"), r"tensor \S+: unknown dtype 'X99'"),
    "reversed_offsets": (_set("data_offsets", lambda e: e["data_offsets"][::-1]), r"tensor \S+: data_offsets \[\d+, \d+\] is not"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_a_corrupt_safetensors_header_is_named(ernie, models_dir, tmp_path, case):
    edit, problem = HEADER_CASES[case]
    header, data = split_file(dit_file(models_dir))
    bad = tmp_path / "bad.safetensors"
    write_file(bad, edit(header), data)
    before = digest(bad)
    with pytest.raises(LetterpressError, match=rf"bad\.safetensors has a corrupt header \({problem}.*\)\. {DOWNLOAD}"):
        node("DiTLoader").run(str(bad), "auto")
    assert digest(bad) == before


def test_valid_but_unusual_headers_still_load(ernie, models_dir, tmp_path):
    """Every dtype of the safetensors format (here U32 and the packed F4, which torch has no type for), and a null
    __metadata__, are valid: extra tensors in them do not make a file "corrupt"."""
    header, data = split_file(dit_file(models_dir))
    end = len(data)
    header["__metadata__"] = None
    header["extra.index"] = {"dtype": "U32", "shape": [4], "data_offsets": [end, end + 16]}
    header["extra.packed"] = {"dtype": "F4", "shape": [8], "data_offsets": [end + 16, end + 20]}
    unusual = tmp_path / "unusual.safetensors"
    write_file(unusual, header, data + bytes(24))
    dit = node("DiTLoader").run(str(unusual), "auto")[0]
    assert dit.module.x_embedder.proj.weight.shape[0] > 0


def test_a_corrupt_header_in_a_diffusers_folder_is_named(ernie, models_dir, tmp_path):
    folder = copy_folder(models_dir, tmp_path)
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    header, data = split_file(vae)
    write_file(vae, _set("shape", lambda e: [e["shape"][0] * 2, e["shape"][1]])(header), data)
    with pytest.raises(LetterpressError, match=rf"diffusion_pytorch_model\.safetensors has a corrupt header .*{DOWNLOAD}"):
        node("VAELoader").run(str(folder), "auto")


def test_an_integer_tensor_as_a_weight_is_named(ernie, models_dir, tmp_path):
    header, data = split_file(dit_file(models_dir))
    key = first_matrix(header)
    header[key]["dtype"] = "I32"  # the same bytes, read as integers
    bad = tmp_path / "int-weights.safetensors"
    write_file(bad, header, data)
    with pytest.raises(LetterpressError, match=rf"tensor {re.escape(key)} in int-weights\.safetensors is stored as "
                                               rf"int32, but it is a weight.*corrupt\. {DOWNLOAD}"):
        node("DiTLoader").run(str(bad), "auto")


# 2. Unreadable files and folders, invalid JSON ----------------------------------------------------


PERMISSION_PROBE = """
import sys
from letterpress.loaders.ernie_image import load_folder
from letterpress.loaders.errors import LetterpressError
from letterpress.loaders.storage import Storage
from letterpress.loaders.weights import open_checkpoint, read_json
for arg in sys.argv[1:]:
    fn, path = arg.split(":", 1)
    try:
        {"open_checkpoint": open_checkpoint, "load_folder": lambda p: load_folder(p, Storage()),
         "read_json": read_json}[fn](path)
        print("LOADED", path)
    except LetterpressError as e:
        print("LPE", e)
    except Exception as e:
        print("DEEP", type(e).__name__, e)
"""


def test_unreadable_files_and_folders_are_named(ernie, models_dir, tmp_path):
    """Run as another user: root reads anything, so as root the probe runs in a user namespace (unshare)."""
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("unshare") or subprocess.run(["unshare", "--user", "true"]).returncode:
            pytest.skip("running as root and cannot drop to an unprivileged user (unshare --user)")
        prefix = ["unshare", "--user"]
    dit = tmp_path / "noread.safetensors"
    shutil.copy(dit_file(models_dir), dit)
    closed = copy_folder(models_dir, tmp_path, "ERNIE-Image")
    tr = copy_folder(models_dir, tmp_path / "b", "ERNIE-Image") / "transformer"
    cfg = copy_folder(models_dir, tmp_path / "c", "ERNIE-Image") / "transformer" / "config.json"
    locked = [dit, closed, tr, cfg]
    for p in locked:
        p.chmod(0)
    try:
        # The loaders' first reads (diffusers is not imported, so the probe starts fast).
        args = [f"open_checkpoint:{dit}", f"load_folder:{closed}", f"open_checkpoint:{tr}", f"read_json:{cfg}"]
        out = subprocess.run([*prefix, sys.executable, "-c", PERMISSION_PROBE, *args], capture_output=True, text=True,
                             timeout=900)  # bounds a hang only
    finally:
        for p in locked:
            p.chmod(0o755)
    lines = out.stdout.splitlines()
    assert len(lines) == 4, out.stdout + out.stderr
    for line, p in zip(lines, locked):
        assert line.startswith(f"LPE cannot read {p}: permission denied. Give your user read access"), line


@pytest.mark.parametrize("text,problem", [("{bad json", r"is not valid JSON \(.*\): download it again"),
                                          ("[]", r"holds a JSON list, not an object: download it again")])
def test_an_invalid_model_index_json_is_named(ernie, models_dir, tmp_path, text, problem):
    folder = copy_folder(models_dir, tmp_path)
    (folder / "model_index.json").write_text(text)
    with pytest.raises(LetterpressError, match=rf"ERNIE-Image/model_index\.json {problem}"):
        node("FolderLoader").run(str(folder), "auto", False)


# 3. and 4. Incomplete downloads: a missing shard, a file of zeros ---------------------------------


def shard_transformer(folder):
    """Split transformer/ into two shards with their index, as large checkpoints ship; the shard paths."""
    tdir = folder / "transformer"
    state = load_file(tdir / "diffusion_pytorch_model.safetensors")
    os.remove(tdir / "diffusion_pytorch_model.safetensors")
    keys = sorted(state)
    names = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    for name, part in zip(names, halves):
        save_file({k: state[k] for k in part}, tdir / name)
    weight_map = {k: name for name, part in zip(names, halves) for k in part}
    (tdir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return [tdir / n for n in names]


def test_a_missing_shard_is_named(ernie, models_dir, tmp_path):
    folder = copy_folder(models_dir, tmp_path)
    os.remove(shard_transformer(folder)[1])
    with pytest.raises(LetterpressError, match=r"diffusion_pytorch_model-00002-of-00002\.safetensors listed in "
                                               r".*transformer/diffusion_pytorch_model\.safetensors\.index\.json is "
                                               r"missing: the download is incomplete"):
        node("DiTLoader").run(str(folder), "auto")


def test_a_stale_index_beside_a_consolidated_file_is_ignored(ernie, models_dir, tmp_path):
    """An index whose shards are all gone, next to the single consolidated file, does not block loading."""
    folder = copy_folder(models_dir, tmp_path)
    single = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    whole = single.read_bytes()
    for shard in shard_transformer(folder):
        os.remove(shard)
    single.write_bytes(whole)
    assert node("DiTLoader").run(str(folder), "auto")[0].module.config.num_layers > 0


def test_a_zero_filled_checkpoint_is_refused(ernie, models_dir, tmp_path):
    header, data = split_file(dit_file(models_dir))
    zeros = tmp_path / "zeros.safetensors"
    write_file(zeros, header, bytes(len(data)))  # what an interrupted preallocated download leaves
    with pytest.raises(LetterpressError, match=rf"zeros\.safetensors: every weight value sampled from it .* is zero, "
                                               rf"so the download is incomplete.*{DOWNLOAD}"):
        node("DiTLoader").run(str(zeros), "auto")
    # One shard of a folder left as zeros is named, the other shard is fine.
    folder = copy_folder(models_dir, tmp_path)
    second = shard_transformer(folder)[1]
    header, data = split_file(second)
    write_file(second, header, bytes(len(data)))
    with pytest.raises(LetterpressError, match=r"^diffusion_pytorch_model-00002-of-00002\.safetensors: every weight "
                                               r"value sampled from it"):
        node("DiTLoader").run(str(folder), "auto")


def test_zero_weight_matrices_alone_do_not_make_a_file_incomplete(ernie, models_dir, tmp_path):
    """Zero-initialised layers are legitimate: a file whose matrices are all zero but whose other weights (norms,
    biases) are not still loads."""
    header, data = split_file(dit_file(models_dir))
    data = bytearray(data)
    for key, info in header.items():
        if key != "__metadata__" and len(info["shape"]) >= 2:
            start, end = info["data_offsets"]
            data[start:end] = bytes(end - start)
    zeroed = tmp_path / "zero-matrices.safetensors"
    write_file(zeroed, header, bytes(data))
    dit = node("DiTLoader").run(str(zeroed), "auto")[0]
    assert not dit.module.x_embedder.proj.weight.any()


# 5. config.json problems in diffusers folders -----------------------------------------------------


def edit_json(path, edit):
    data = json.loads(open(path).read())
    with open(path, "w") as f:
        f.write(json.dumps(edit(data)))


def test_a_config_json_that_is_not_an_object_is_named(ernie, models_dir, tmp_path):
    folder = copy_folder(models_dir, tmp_path)
    edit_json(folder / "transformer" / "config.json", lambda c: list(c))
    with pytest.raises(LetterpressError, match=r"transformer/config\.json holds a JSON list, not an object: download "
                                               r"it again"):
        node("DiTLoader").run(str(folder), "auto")


def test_a_config_value_of_the_wrong_type_is_named(ernie, models_dir, tmp_path):
    folder = copy_folder(models_dir, tmp_path)
    edit_json(folder / "transformer" / "config.json", lambda c: {**c, "num_layers": "two"})
    with pytest.raises(LetterpressError, match=rf"transformer/config\.json: its settings do not build the model "
                                               rf"\(TypeError: .*\).*{DOWNLOAD}"):
        node("DiTLoader").run(str(folder), "auto")


def test_a_config_key_this_diffusers_does_not_know_is_ignored(ernie, models_dir, tmp_path):
    """As diffusers' from_pretrained does (with a warning): a newer release's extra setting does not block loading."""
    folder = copy_folder(models_dir, tmp_path)
    for part in ("transformer", "vae"):
        edit_json(folder / part / "config.json", lambda c: {**c, "setting_from_a_newer_release": 1})
    assert node("DiTLoader").run(str(folder), "auto")[0].module.config.num_layers > 0
    assert node("VAELoader").run(str(folder), "auto")[0].module is not None


def test_glm_vae_latents_stats_of_the_wrong_length_are_named(glm, models_dir, tmp_path):
    vae = tmp_path / "vae"
    shutil.copytree(os.path.join(models_dir, "diffusers", "GLM-Image", "vae"), vae)
    edit_json(vae / "config.json", lambda c: {**c, "latents_mean": c["latents_mean"][:-1]})
    with pytest.raises(LetterpressError, match=rf"vae/config\.json: latents_mean must list one number per latent "
                                               rf"channel \(\d+\), not .*{DOWNLOAD}"):
        N["LetterpressGlmImageVAELoader"]().run(str(vae), "auto")


def test_a_shard_picked_in_the_list_loads_the_whole_checkpoint(ernie, models_dir, tmp_path, host):
    """A sharded transformer/ folder copied under diffusion_models/ is listed once (its first shard) and loads
    whole; a missing shard is named."""
    from letterpress.loaders.files import list_files

    folder = copy_folder(models_dir, tmp_path)
    shards = shard_transformer(folder)
    host.models_dir = str(tmp_path / "tree")
    os.makedirs(tmp_path / "tree")
    shutil.copytree(folder / "transformer", tmp_path / "tree" / "diffusion_models" / "ernie_sharded")
    listed = [f for f in list_files("diffusion_models") if f.startswith("ernie_sharded/")]
    assert listed == ["ernie_sharded/" + shards[0].name]
    dit = node("DiTLoader").run(listed[0], "auto")[0]
    ref = load_file(os.path.join(models_dir, "diffusion_models", "ernie-image.safetensors"))
    got = dit.module.state_dict()
    assert all(torch.equal(got[k[len("model.diffusion_model."):]], v) for k, v in ref.items())
    os.remove(tmp_path / "tree" / "diffusion_models" / "ernie_sharded" / shards[1].name)
    with pytest.raises(LetterpressError, match=f"is shard 1 of 2, and {shards[1].name} is not beside it"):
        node("DiTLoader").run(listed[0], "auto")


@pytest.mark.parametrize("head,what", [(b"GGUF\x03\x00\x00\x00", "not a readable GGUF file"),
                                       (b"PK\x03\x04", "a PyTorch pickle .*not a safetensors file")])
def test_other_formats_renamed_to_safetensors_are_named(ernie, tmp_path, host, head, what):
    """A file is read by what it holds, not its name: a GGUF under a .safetensors name is read as GGUF (this one is
    cut short, so it is named as a damaged GGUF), a pickle is named as one."""
    os.makedirs(tmp_path / "diffusion_models")
    (tmp_path / "diffusion_models" / "renamed.safetensors").write_bytes(head + bytes(64))
    host.models_dir = str(tmp_path)
    with pytest.raises(LetterpressError, match=f"renamed.safetensors is {what}"):
        node("DiTLoader").run("renamed.safetensors", "auto")


def test_an_ovis_original_file_missing_tensors_is_named(ovis, models_dir, tmp_path):
    """A FLUX-style Ovis-Image file with a layer left out (a partial export) names what it lacks, before any load."""
    state = load_file(os.path.join(models_dir, "diffusion_models", "ovis_image.safetensors"))
    for k in [k for k in state if k.startswith("double_blocks.1.txt_mlp.")]:
        del state[k]
    path = tmp_path / "ovis_partial.safetensors"
    save_file(state, path)
    with pytest.raises(LetterpressError, match=r"lacks double_blocks\.1\.txt_mlp\.down_proj\.bias, .* and 3 more; it is "
                                               r"not a whole Ovis-Image DiT"):
        N["LetterpressOvisImageDiTLoader"]().run(str(path), "auto")
