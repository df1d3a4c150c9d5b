"""The family registry (loaders/families.py): a family's names appear only in its own files and the registry, and
every registered SPEC is complete and agrees with the family's files, nodes and tiny checkpoints."""

from __future__ import annotations

import dataclasses
import glob
import importlib
import os
import re

import pytest
import torch
from safetensors import safe_open

from letterpress.loaders import detect, explain, families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_SOURCES = ["cli.py", "runner.py", "core_nodes.py", "__init__.py", "__main__.py", "loaders", "samplers", "nodes"]



def _pack_files() -> list[str]:
    found = []
    for entry in PACK_SOURCES:
        path = os.path.join(ROOT, entry)
        if os.path.isdir(path):
            found += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(path, "**", "*.py"), recursive=True))
        elif os.path.isfile(path):
            found.append(entry)
    return found


def _node_module(spec):
    return importlib.import_module(f"letterpress.nodes.{spec.key}")


def _names(spec) -> list[re.Pattern]:
    """The family's names: its key (any case: LP_ERNIE_VL too), title, node class stem and the first word of its
    nodes' display names."""
    prefixes = {d.split(" ")[0] for d in _node_module(spec).DISPLAY_NAMES.values()}
    exact = sorted({spec.title, spec.class_stem, *prefixes})
    return [re.compile(re.escape(spec.key), re.IGNORECASE)] + [re.compile(re.escape(n)) for n in exact]


def test_no_family_name_outside_its_own_files():
    files = _pack_files()
    assert "loaders/detect.py" in files and "nodes/__init__.py" in files and len(files) > 60
    stray = []
    for spec in families.all():
        patterns = _names(spec)
        for rel in files:
            base = os.path.basename(rel)
            if base.startswith(spec.key) or rel == "loaders/families.py":
                continue
            with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    hits = [p.pattern for p in patterns if p.search(line)]
                    if hits:
                        stray.append(f"{rel}:{n}: {hits} {line.strip()[:100]}")
    assert not stray, "family names outside the family's files:\n" + "\n".join(stray)


def test_the_grep_sees_a_name_where_one_is_written(tmp_path):
    """The patterns catch each form of a name (a test of the test): key in any case, title, class stem."""
    spec = families.get(families.REGISTERED[0])
    patterns = _names(spec)
    for line in (f"x = '{spec.key}'", f"LP_{spec.key.upper()}", f"the {spec.title} DiT", f"Letterpress{spec.class_stem}X"):
        assert any(p.search(line) for p in patterns), line
    assert not any(p.search("a family-neutral line of code") for p in patterns)


# The registry itself ---------------------------------------------------------------------------------------------


def test_registry_holds_every_family_once_with_its_three_files():
    specs = families.all()
    assert [s.key for s in specs] == list(families.REGISTERED) and len(set(families.REGISTERED)) == len(specs)
    assert len({s.title for s in specs}) == len(specs) and len({s.class_stem for s in specs}) == len(specs)
    for spec in specs:
        assert isinstance(spec, families.FamilySpec) and families.get(spec.key) is spec
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.title = "changed"  # type: ignore[misc]
        for layer in ("loaders", "samplers", "nodes"):
            assert os.path.isfile(os.path.join(ROOT, layer, f"{spec.key}.py")), f"{layer}/{spec.key}.py"
    with pytest.raises(KeyError, match="not a registered model family.*REGISTERED"):
        families.get("made_up")
    assert families.title("made_up") == "made_up"  # a message about an unknown family still reads


def test_nodes_come_from_the_registry_and_are_named_after_their_family():
    from letterpress import nodes

    every = dict(nodes.NODE_CLASS_MAPPINGS)
    for spec in families.all():
        module = _node_module(spec)
        assert module.NODES and set(module.NODES) == set(module.DISPLAY_NAMES)
        assert all(name.startswith(f"Letterpress{spec.class_stem}") for name in module.NODES), spec.key
        for name, cls in module.NODES.items():
            assert every.pop(name) is cls
    # what is left are the tools that serve every family, listed apart
    assert set(every) == {n for tool in nodes.TOOLS for n in tool.NODES}
    for tool in nodes.TOOLS:
        assert not any(n.startswith(f"Letterpress{s.class_stem}") for n in tool.NODES for s in families.all())


def test_messages_name_nodes_that_exist():
    """encode_node and the first of latent_nodes are display names of the family's own nodes; a family with a DiT
    sampler has a working-memory factor."""
    for spec in families.all():
        shown = set(_node_module(spec).DISPLAY_NAMES.values())
        dit_nodes = [d for d in shown if d.endswith("DiT Sample")]
        if not dit_nodes:
            continue
        assert spec.encode_node in shown, (spec.key, spec.encode_node)
        first = spec.latent_nodes.split(",")[0].split(" or ")[0]
        assert first in shown, (spec.key, first)
        assert spec.dit_factor is not None and 1 < spec.dit_factor < 100


def test_an_unmeasured_family_is_not_a_key_error():
    from letterpress.loaders.handle import ModelHandle
    from letterpress.samplers import working_memory

    measured = [s.dit_factor for s in families.all() if s.dit_factor is not None]
    handle = ModelHandle("a_new_family", "dit", torch.nn.Linear(1, 1).half())
    assert working_memory.dit(handle, 2, 10, 8) == int(max(measured) * 2 * 10 * 8 * 2)
    own = families.all()[0]
    handle = ModelHandle(own.key, "dit", torch.nn.Linear(1, 1).half())
    assert working_memory.dit(handle, 1, 10, 8) == int(own.dit_factor * 10 * 8 * 2)


def test_text_reader_type_is_what_its_loader_node_returns():
    reader = families.text_reader()
    assert reader is not None and reader.text_reader.io_type
    returned = {t for cls in _node_module(reader).NODES.values() for t in getattr(cls, "RETURN_TYPES", ())}
    assert reader.text_reader.io_type in returned
    sampler = importlib.import_module(f"letterpress.samplers.{reader.key}")
    assert callable(sampler.vl_generate) and callable(sampler.parse_boxes)  # what Read Text calls


# Sources ---------------------------------------------------------------------------------------------------------


def test_sources_belong_to_their_family_and_a_loader_takes_each_single_file():
    for spec in families.all():
        assert spec.sources, spec.key
        folders = [s for s in spec.sources if s.role == "folder"]
        assert folders and all(s.family == spec.key for s in spec.sources)
        assert all(bool(s.pipeline) != bool(s.model_type) for s in folders)  # one way to tell the folder
        loaders = [c for c in _node_module(spec).NODES.values() if getattr(c, "INPUT", "")]
        for s in spec.sources:
            if s.role == "folder":
                continue
            assert s.file and s.repo, s
            assert explain.file_source(s.kind, s.name) is s
            assert any(c.FAMILY == spec.key and c.ROLE == s.role and c.KIND == s.kind for c in loaders), s
            if s.companion:  # a tokenizer fetched beside the file: --download asks the family where its loader looks
                assert spec.tokenizer_folders is not None, f"{spec.key}: {s.name} has a companion, no tokenizer_folders"
                assert spec.tokenizer_folders(s.role, "/models/x.safetensors"), s


def test_a_family_names_its_folder_sources_by_name_the_first_by_default():
    spec = families.get("ernie_image")
    folders = [s for s in spec.sources if s.role == "folder"]
    assert len(folders) > 1 and spec.folder() is folders[0]
    assert all(spec.folder(s.name) is s for s in folders)
    with pytest.raises(KeyError, match="ERNIE-Image has no folder source 'nope'.*loaders/ernie_image.py"):
        spec.folder("nope")
    with pytest.raises(KeyError):  # a single file is no folder
        spec.folder(next(s.name for s in spec.sources if s.role != "folder"))


def test_each_tiny_folder_is_accepted_by_its_family_and_refused_by_the_others(ernie, ovis, glm, ernie_vl):
    folder_of = {"ernie_image": "ERNIE-Image", "ovis_image": "Ovis-Image-7B", "glm_image": "GLM-Image",
                 "ernie_vl": "ERNIE-4.5-VL-28B-A3B-PT"}
    assert set(folder_of) == set(families.REGISTERED)
    for spec in families.all():
        source = next(s for s in spec.sources if s.role == "folder" and s.name == folder_of[spec.key])
        check = explain.explain_llm_folder if source.model_type else explain.explain_diffusers_folder
        assert check(source.name, spec.key, "its loader") is None, spec.key
        for other in families.all():
            if other is not spec and bool(other.model_types) == bool(spec.model_types):
                refusal = check(source.name, other.key, "the other loader")
                assert refusal and spec.title in refusal, (other.key, refusal)


# Signatures ------------------------------------------------------------------------------------------------------

# What each tiny checkpoint is (the fixtures write them): the family of the fixture, and the architecture (its own
# or a shared one) and role, independent of the signatures that must tell it.
TINY = {
    "diffusers/ERNIE-Image/transformer": ("ernie_image", "ernie_image", "dit"),
    "diffusers/ERNIE-Image/text_encoder": ("ernie_image", "ministral3", "text_encoder"),
    "diffusers/ERNIE-Image/vae": ("ernie_image", "flux2_vae", "vae"),
    "diffusion_models/ernie-image.safetensors": ("ernie_image", "ernie_image", "dit"),
    "text_encoders/ministral-3-3b.safetensors": ("ernie_image", "ministral3", "text_encoder"),
    "vae/flux2-vae.safetensors": ("ernie_image", "flux2_vae", "vae"),
    "diffusers/Ovis-Image-7B/transformer": ("ovis_image", "ovis_image", "dit"),
    "diffusers/Ovis-Image-7B/text_encoder": ("ovis_image", "qwen3", "text_encoder"),
    "diffusion_models/ovis_image.safetensors": ("ovis_image", "ovis_image", "dit"),
    "diffusion_models/ovis_image_bf16.safetensors": ("ovis_image", "ovis_image", "dit"),
    "text_encoders/ovis_2.5.safetensors": ("ovis_image", "qwen3", "text_encoder"),
    "vae/ae.safetensors": ("ovis_image", "kl_vae", "vae"),
    "diffusers/GLM-Image/vision_language_encoder": ("glm_image", "glm_image", "ar"),
    "diffusers/GLM-Image/transformer": ("glm_image", "glm_image", "dit"),
    "diffusers/GLM-Image/text_encoder": ("glm_image", "t5", "text_encoder"),
    "diffusers/GLM-Image/vae": ("glm_image", "kl_vae", "vae"),
}


def _keys(path: str) -> list[str]:
    files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*.safetensors")))
    assert files, path
    keys = []
    for f in files:
        with safe_open(f, "pt") as st:
            keys += list(st.keys())
    return keys


def test_signatures_tell_every_tiny_checkpoint(models_dir, ernie, ovis, glm):
    found = {rel: detect.describe(_keys(os.path.join(models_dir, rel))) for rel in TINY}
    assert {rel: d[:2] if d else None for rel, d in found.items()} == {rel: t[1:] for rel, t in TINY.items()}
    for spec in families.all():
        mine = [rel for rel, t in TINY.items() if t[0] == spec.key]
        if spec.key != "ernie_vl":  # loaded by transformers from its folder, not told by tensor names
            assert mine, spec.key
        # every signature of the family tells one of its checkpoints, and every shared architecture it names is one
        # of its stages; a shared one's name in messages says which families use it
        for sig in spec.signatures:
            assert any(found[rel][2] == sig.name for rel in mine), (spec.key, sig.name)
        used = {TINY[rel][1] for rel in mine} - {spec.key}
        assert set(spec.components) == used, (spec.key, spec.components, used)
        for rel in mine:
            if TINY[rel][1] != spec.key:
                assert spec.title in found[rel][2], found[rel]


def test_family_signatures_come_before_the_shared_ones():
    order = [s[0] for s in detect.signatures()]
    shared = {c[0] for c in detect.COMPONENTS}
    first_shared = min(i for i, k in enumerate(order) if k in shared)
    assert all(k in families.REGISTERED for k in order[:first_shared])
    assert not any(k in families.REGISTERED for k in order[first_shared:])
    assert not shared & set(families.REGISTERED)
