"""A loader's pick that is not what it needs is explained before anything loads (issue #20): a folder of another
model, half downloaded, placed a level too deep or missing; a single file missing or of another model; a
models/LLM folder of another model. Through the headless runner (which validates as ComfyUI does) and the nodes.
The download sources named are README's "Model files" table, written out here independently of the code."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from letterpress.loaders.errors import LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N
from letterpress.runner import Runner, WorkflowError, load_workflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVIS_WF = os.path.join(ROOT, "workflows", "api", "ovis_image_t2i_api.json")


def tree(tmp_path, host, **folders):
    """A models/ tree under tmp_path holding copies of the session's folders: {'diffusers/X': 'diffusers/Y'}."""
    models = tmp_path / "models"
    for dst, src in folders.items():
        shutil.copytree(os.path.join(host.session_models, src), models / dst.replace("__", "/"))
    (models / "diffusers").mkdir(parents=True, exist_ok=True)
    host.models_dir = str(models)
    return models


@pytest.fixture
def host(host, models_dir):
    host.session_models = models_dir
    return host


def refused(wf) -> str:
    with pytest.raises(WorkflowError) as e:
        Runner().validate(wf)
    return str(e.value)


def test_a_folder_of_another_model_is_named_with_what_it_holds(ernie, ovis, tmp_path, host):
    """The issue's case: ERNIE-Image's folder under models/diffusers/Ovis-Image-7B, ovis_image_t2i queued."""
    models = tree(tmp_path, host, **{"diffusers__Ovis-Image-7B": "diffusers/ERNIE-Image"})
    loader = N["LetterpressOvisImageFolderLoader"]
    assert loader.INPUT_TYPES()["required"]["folder"][0] == ["Ovis-Image-7B"]  # listed, not hidden
    msg = refused(load_workflow(OVIS_WF))
    assert ("node 1 (LetterpressOvisImageFolderLoader): Ovis-Image-7B holds an ErnieImagePipeline (ERNIE-Image); "
            "the Ovis-Image Folder Loader needs an OvisImagePipeline. Use an ERNIE-Image loader for this folder, or "
            "download the Hugging Face repository AIDC-AI/Ovis-Image-7B into "
            f"{models / 'diffusers' / 'Ovis-Image-7B'}") in msg
    # the node says the same when it runs (a linked or direct call skips validation)
    with pytest.raises(LetterpressError, match="Ovis-Image-7B holds an ErnieImagePipeline"):
        loader().run("Ovis-Image-7B", "auto")


def test_the_familys_folders_come_first_and_others_follow(ernie, ovis, glm, host):
    lists = {name: N[name].INPUT_TYPES()["required"]["folder"][0]
             for name in ("LetterpressOvisImageFolderLoader", "LetterpressErnieImageFolderLoader",
                          "LetterpressGlmImageFolderLoader")}
    everything = sorted(d for d in os.listdir(os.path.join(host.session_models, "diffusers")))
    for listed in lists.values():
        assert sorted(listed) == everything  # every folder stays pickable: shipped workflows' values included
    assert lists["LetterpressOvisImageFolderLoader"][0] == "Ovis-Image-7B"
    assert lists["LetterpressGlmImageFolderLoader"][0] == "GLM-Image"
    assert set(lists["LetterpressErnieImageFolderLoader"][:2]) == {"ERNIE-Image", "ERNIE-Image-Turbo"}


def test_a_half_downloaded_folder_names_what_is_missing(ovis, tmp_path, host):
    models = tree(tmp_path, host, **{"diffusers__Ovis-Image-7B": "diffusers/Ovis-Image-7B"})
    shutil.rmtree(models / "diffusers" / "Ovis-Image-7B" / "transformer")
    for f in (models / "diffusers" / "Ovis-Image-7B" / "vae").glob("*.safetensors"):
        f.unlink()
    msg = refused(load_workflow(OVIS_WF))
    path = models / "diffusers" / "Ovis-Image-7B"
    assert ("Ovis-Image-7B is an OvisImagePipeline (Ovis-Image) but an incomplete download: it lacks transformer/, "
            f"the weights of vae/. Download the missing files from AIDC-AI/Ovis-Image-7B into {path}") in msg


def test_an_interrupted_download_without_model_index_is_named(ovis, tmp_path, host):
    models = tree(tmp_path, host)
    partial = models / "diffusers" / "Ovis-Image-7B" / ".cache" / "huggingface" / "download"
    partial.mkdir(parents=True)
    (partial / "abc.incomplete").write_bytes(b"\0")
    assert "a download that did not finish" in refused(load_workflow(OVIS_WF))


def test_a_folder_placed_one_level_too_deep_is_named(ovis, tmp_path, host):
    models = tree(tmp_path, host, **{"diffusers__Ovis-Image-7B__Ovis-Image-7B": "diffusers/Ovis-Image-7B"})
    msg = refused(load_workflow(OVIS_WF))
    outer = models / "diffusers" / "Ovis-Image-7B"
    assert ("Ovis-Image-7B holds no model_index.json, but its subfolder Ovis-Image-7B holds an OvisImagePipeline "
            f"(Ovis-Image): the model was placed one level too deep. Move the contents of {outer / 'Ovis-Image-7B'} up "
            f"into {outer}, or pick 'Ovis-Image-7B/Ovis-Image-7B'") in msg
    assert N["LetterpressOvisImageFolderLoader"].INPUT_TYPES()["required"]["folder"][0] == [
        "Ovis-Image-7B/Ovis-Image-7B", "Ovis-Image-7B"]


@pytest.mark.parametrize("workflow, repo, folder", [
    ("ernie_image_t2i_api.json", "baidu/ERNIE-Image", "ERNIE-Image"),
    ("ernie_image_turbo_t2i_api.json", "baidu/ERNIE-Image-Turbo", "ERNIE-Image-Turbo"),
    ("ovis_image_t2i_api.json", "AIDC-AI/Ovis-Image-7B", "Ovis-Image-7B"),
    ("glm_image_t2i_api.json", "zai-org/GLM-Image", "GLM-Image"),
])
def test_a_new_users_first_run_names_the_repository_and_the_path(tmp_path, host, workflow, repo, folder):
    host.models_dir = str(tmp_path / "models")
    msg = refused(load_workflow(os.path.join(ROOT, "workflows", "api", workflow)))
    where = tmp_path / "models" / "diffusers" / folder
    assert f"'{folder}' is not a folder in {tmp_path / 'models' / 'diffusers'} (which does not exist)" in msg
    assert f"download the Hugging Face repository {repo} into {where} (hf download {repo} --local-dir {where})" in msg


def test_single_file_loaders_name_where_to_get_a_missing_file(ernie, ovis, tmp_path, host):
    wf = load_workflow(os.path.join(ROOT, "workflows", "api", "ernie_image_single_files_api.json"))
    host.models_dir = str(tmp_path / "models")
    msg = refused(wf)
    assert "'ernie-image-turbo.safetensors' is not a file in" in msg or "'ernie-image.safetensors' is not a file in" in msg
    assert "vae/flux2-vae.safetensors from the Hugging Face repository Comfy-Org/ERNIE-Image to " \
           f"{tmp_path / 'models' / 'vae' / 'flux2-vae.safetensors'}" in msg
    assert f"baidu/ERNIE-Image downloaded into {tmp_path / 'models' / 'diffusers' / 'ERNIE-Image'}" in msg
    # Ovis's DiT: the Comfy-Org file
    verdict = N["LetterpressOvisImageDiTLoader"].VALIDATE_INPUTS(dit_name="ovis_image_bf16.safetensors", weight_dtype="auto")
    assert ("split_files/diffusion_models/ovis_image_bf16.safetensors from the Hugging Face repository "
            f"Comfy-Org/Ovis-Image to {tmp_path / 'models' / 'diffusion_models' / 'ovis_image_bf16.safetensors'}") in verdict
    # a dtype the list does not hold is still refused (the node's check replaces the host's list check)
    assert "weight_dtype 'fp4'" in N["LetterpressOvisImageDiTLoader"].VALIDATE_INPUTS(dit_name="x", weight_dtype="fp4")


def test_a_single_file_of_another_model_says_where_to_get_the_right_one(ernie, ovis, host):
    assert N["LetterpressOvisImageDiTLoader"].VALIDATE_INPUTS(dit_name="ernie-image.safetensors", weight_dtype="auto")
    with pytest.raises(LetterpressError, match=r"holds a ERNIE-Image DiT, not Ovis-Image DiT.*To get the Ovis-Image DiT: "
                                               r"download split_files/diffusion_models/ovis_image_bf16.safetensors from "
                                               r"the Hugging Face repository Comfy-Org/Ovis-Image"):
        N["LetterpressOvisImageDiTLoader"]().run("ernie-image.safetensors", "auto")


def test_llm_folder_of_another_model_or_missing_is_named(ovis, tmp_path, host):
    models = tree(tmp_path, host, **{"LLM__Qwen3": "diffusers/Ovis-Image-7B/text_encoder",
                                     "LLM__Nested__ERNIE-4.5-VL-28B-A3B-PT": "diffusers/Ovis-Image-7B/text_encoder"})
    cfg = models / "LLM" / "Nested" / "ERNIE-4.5-VL-28B-A3B-PT" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "model_type": "ernie4_5_vl_moe"}))
    loader = N["LetterpressErnieVLLoader"]
    assert loader.INPUT_TYPES()["required"]["folder"][0] == ["Nested/ERNIE-4.5-VL-28B-A3B-PT", "Nested", "Qwen3"]
    assert loader.VALIDATE_INPUTS(folder="Qwen3").startswith(
        "Qwen3 holds a 'qwen3' model; the ERNIE-VL Loader needs model_type ernie4_5_vl_moe. This loader needs an "
        "ERNIE-4.5-VL or ERNIE-4.5-VL Thinking folder: download the Hugging Face repository baidu/ERNIE-4.5-VL-28B-A3B-PT")
    assert "placed one level too deep" in loader.VALIDATE_INPUTS(folder="Nested")
    where = models / "LLM" / "ERNIE-4.5-VL-28B-A3B-Thinking"
    assert (f"download the Hugging Face repository baidu/ERNIE-4.5-VL-28B-A3B-Thinking into {where} "
            in loader.VALIDATE_INPUTS(folder="ERNIE-4.5-VL-28B-A3B-Thinking"))


def test_readme_model_table_is_the_code_table():
    from letterpress.loaders.explain import readme_table

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert readme_table() in f.read()


def test_each_single_file_source_is_a_properties_models_entry_comfyui_can_download():
    """ComfyUI's missing-models dialog saves an entry's url under models/<directory>/<name>: the url names the file
    by that name, in a folder ComfyUI has, and ERNIE-Image's files come from the repository its templates use."""
    from letterpress.loaders.explain import models

    comfy_folders = {"diffusion_models", "text_encoders", "vae", "diffusers", "LLM", "loras", "checkpoints"}
    files = [s for s in models() if s.file]
    assert files and all(s.kind in comfy_folders for s in models())
    for s in files:
        entry = s.as_model()
        assert entry == {"name": s.name, "url": f"https://huggingface.co/{s.repo}/resolve/main/{s.file}",
                         "directory": s.kind}
        assert entry["url"].rsplit("/", 1)[1] == entry["name"]
    vae = next(s for s in models() if s.name == "flux2-vae.safetensors")
    assert vae.url == "https://huggingface.co/Comfy-Org/ERNIE-Image/resolve/main/vae/flux2-vae.safetensors"


def test_ernie_image_single_files_name_the_comfy_org_files(tmp_path, host):
    """A new user's first run of ernie_image_single_files: each missing file is named with Comfy-Org's repackaged
    file (huggingface.co/Comfy-Org/ERNIE-Image) and the exact path to put it at, in sentences of their own."""
    models = tmp_path / "models"
    host.models_dir = str(models)
    msg = refused(load_workflow(os.path.join(ROOT, "workflows", "api", "ernie_image_single_files_api.json")))
    assert ("(which does not exist). The ERNIE-Image DiT Loader needs an ERNIE-Image DiT file: download "
            "diffusion_models/ernie-image.safetensors from the Hugging Face repository Comfy-Org/ERNIE-Image to "
            f"{models / 'diffusion_models' / 'ernie-image.safetensors'}") in msg
    assert ("The ERNIE-Image Text Encoder Loader needs an ERNIE-Image text encoder file: download "
            "text_encoders/ministral-3-3b.safetensors from the Hugging Face repository Comfy-Org/ERNIE-Image to "
            f"{models / 'text_encoders' / 'ministral-3-3b.safetensors'}") in msg
    verdict = N["LetterpressErnieImagePromptEnhancerLoader"].VALIDATE_INPUTS(
        prompt_enhancer_name="ernie-image-prompt-enhancer.safetensors", weight_dtype="auto")
    assert ("text_encoders/ernie-image-prompt-enhancer.safetensors from the Hugging Face repository "
            "Comfy-Org/ERNIE-Image") in verdict


def test_a_file_or_folder_in_another_model_folder_is_found_there(ernie, ovis, tmp_path, host):
    models = tree(tmp_path, host, **{"LLM__Ovis-Image-7B": "diffusers/Ovis-Image-7B"})
    (models / "checkpoints").mkdir()
    shutil.copy(os.path.join(host.session_models, "diffusion_models", "ernie-image.safetensors"), models / "checkpoints")
    verdict = N["LetterpressErnieImageDiTLoader"].VALIDATE_INPUTS(dit_name="ernie-image.safetensors", weight_dtype="auto")
    assert f"It is in {models / 'checkpoints'}: move it to {models / 'diffusion_models'}." in verdict
    msg = refused(load_workflow(OVIS_WF))
    assert f"It is in {models / 'LLM'}: move it to {models / 'diffusers'}." in msg


def test_a_single_file_loader_reports_a_missing_file_once_and_leaves_the_dtype_to_the_list_check(ernie, host):
    """Each single-file loader's VALIDATE_INPUTS names its file input only: the runner (as ComfyUI) checks the dtype
    against its list, and a missing file is one problem, not one per input."""
    wf = load_workflow(os.path.join(ROOT, "workflows", "api", "ernie_image_single_files_api.json"))
    wf["1"]["inputs"]["weight_dtype"] = "fp4"
    assert "node 1 (LetterpressErnieImageDiTLoader) input 'weight_dtype': 'fp4' is not available" in refused(wf)
    wf["1"]["inputs"].update(weight_dtype="auto", dit_name="elsewhere/ernie-image.safetensors")
    assert refused(wf).count("node 1 (LetterpressErnieImageDiTLoader)") == 1


def test_every_node_has_its_help_page_as_generated_with_a_description_and_every_input_a_tooltip():
    """web/docs/<NodeName>.md is what ComfyUI's editor shows as a custom node's help (nodes/help.py): one per node,
    equal to what tools/help_pages.py writes from the node's own texts and the sources table."""
    from letterpress.nodes import NODE_CLASS_MAPPINGS
    from letterpress.nodes.help import DOCS, pages

    wanted = pages()
    folder = os.path.join(ROOT, DOCS)
    assert sorted(os.listdir(folder)) == sorted(f"{name}.md" for name in NODE_CLASS_MAPPINGS)
    for name, text in wanted.items():
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            assert f.read() == text, f"{name}: run python tools/help_pages.py"
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert cls.DESCRIPTION.strip(), name
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for key, value in spec.get(group, {}).items():
                assert len(value) > 1 and value[1].get("tooltip", "").strip(), f"{name}.{key}"
    assert "[Comfy-Org/ERNIE-Image/vae/flux2-vae.safetensors](https://huggingface.co/Comfy-Org/ERNIE-Image/resolve/main/" \
           "vae/flux2-vae.safetensors)" in wanted["LetterpressErnieImageVAELoader.md"]
