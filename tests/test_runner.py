"""The headless runner: shipped workflows on the tiny models, PNG metadata, no overwrites, and
clear errors for broken workflow files before any model loads."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from letterpress import cli
from letterpress.runner import Runner, WorkflowError, load_workflow, set_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(ROOT, "workflows", "api")
SMALL = ["width=32", "height=32", "steps=2"]


def run_cli(workflow, models_dir, out, *sets):
    args = ["run", os.path.join(WORKFLOWS, workflow), "--models-dir", models_dir, "--output-dir", str(out), "--quiet"]
    for s in sets:
        args += ["--set", s]
    return cli.main(args)


@pytest.mark.parametrize("workflow", ["ernie_image_t2i_api.json", "ernie_image_turbo_t2i_api.json",
                                      "ernie_image_single_files_api.json"])
def test_shipped_workflow_runs_headless(ernie, models_dir, tmp_path, workflow, capsys):
    assert run_cli(workflow, models_dir, tmp_path, *SMALL, "prompt=a red poster") == 0
    written = capsys.readouterr().out.split()
    assert len(written) == 1 and written[0].endswith("_00001_.png")
    img = Image.open(written[0])
    assert img.size == (32, 32)
    embedded = json.loads(img.text["prompt"])
    texts = [n["inputs"]["prompt"] for n in embedded.values() if n["_meta"]["title"] == "Prompt"]
    assert texts == ["a red poster"]  # the workflow as run, with --set applied


def test_enhanced_workflow_headless_shows_the_rewritten_prompt(ernie, models_dir, tmp_path, capsys):
    """Preview Any's text goes to stderr, titled; stdout stays the list of written images."""
    assert run_cli("ernie_image_enhanced_t2i_api.json", models_dir, tmp_path, "width=32", "height=32", "steps=1",
                   "max_new_tokens=6", "4.prompt=a red poster") == 0
    out, err = capsys.readouterr()
    assert len(out.split()) == 1 and out.split()[0].endswith(".png")
    shown = [line for line in err.splitlines() if line.startswith("[Enhanced prompt (preview)] ")]
    assert len(shown) == 1 and shown[0] != "[Enhanced prompt (preview)] a red poster"


def test_second_run_never_overwrites(ernie, models_dir, tmp_path, capsys):
    run_cli("ernie_image_turbo_t2i_api.json", models_dir, tmp_path, *SMALL, "seed=1")
    first = capsys.readouterr().out.split()[0]
    before = open(first, "rb").read()
    run_cli("ernie_image_turbo_t2i_api.json", models_dir, tmp_path, *SMALL, "seed=2")
    second = capsys.readouterr().out.split()[0]
    assert first != second and second.endswith("_00002_.png")
    assert open(first, "rb").read() == before


def test_requeue_with_new_seed_reuses_models_and_encodings(ernie, models_dir, host):
    wf = set_values(load_workflow(os.path.join(WORKFLOWS, "ernie_image_t2i_api.json")), SMALL)
    runner = Runner()
    a = runner.run(wf)
    assert set(runner.executed) == set(wf)
    b = runner.run(set_values(wf, ["seed=99"]))
    assert sorted(runner.executed) == ["5", "6", "7"]  # sampler, decode, save: loaders and encodes cached
    img_a, img_b = a["results"]["6"][0], b["results"]["6"][0]
    assert (img_a - img_b).abs().max() > 0.05


def test_cache_follows_what_nodes_depend_on_not_their_ids(ernie, models_dir, host):
    """As ComfyUI's cache: keyed by a node's type, values and inputs; what the next workflow does not use is
    dropped before it runs."""
    runner = Runner()
    wf = set_values(load_workflow(os.path.join(WORKFLOWS, "ernie_image_t2i_api.json")), SMALL)
    runner.run(wf)
    renumbered = json.loads(json.dumps(wf).replace('["1", ', '["11", '))
    renumbered["11"] = renumbered.pop("1")
    runner.run(renumbered)
    assert sorted(runner.executed) == ["7"]  # the same graph under other ids: only the output node runs again
    twice = {**wf, "8": {**wf["2"]}}  # a second, identical text encode
    runner.run(twice)
    assert "8" not in runner.executed and "2" not in runner.executed
    def sources():
        return {str(getattr(x, "source", "")) for out in runner.cache.values() for x in out} - {""}

    assert any("ERNIE-Image" in source for source in sources())
    runner.run(set_values(load_workflow(os.path.join(WORKFLOWS, "ernie_image_single_files_api.json")), SMALL))
    assert sources() and not any("ERNIE-Image" in source for source in sources())  # the folder's models let go


def test_ambiguous_set_names_the_choices():
    wf = load_workflow(os.path.join(WORKFLOWS, "ernie_image_t2i_api.json"))
    assert set_values(wf, ["prompt=x"])["2"]["inputs"]["prompt"] == "x"  # the node titled Prompt
    assert set_values(wf, ["3.prompt=blurry"])["3"]["inputs"]["prompt"] == "blurry"
    with pytest.raises(WorkflowError, match=r"no node of this workflow has an input 'nonexistent' \(inputs you can set: .*seed"):
        set_values(wf, ["nonexistent=1"])
    with pytest.raises(WorkflowError, match=r"node 5 \(LetterpressErnieImageSampler\) has no input 'stepz' .*steps"):
        set_values(wf, ["5.stepz=3"])  # a typo after a node id is refused, not silently added
    with pytest.raises(WorkflowError, match="this workflow has no node 99"):
        set_values(wf, ["99.seed=1"])
    with pytest.raises(WorkflowError, match="expected true or false"):
        set_values(wf, ["load_prompt_enhancer=maybe"])
    files = load_workflow(os.path.join(WORKFLOWS, "ernie_image_single_files_api.json"))
    with pytest.raises(WorkflowError, match=r"3 nodes take 'weight_dtype' \(choices: 1.weight_dtype, 8.weight_dtype, 9"):
        set_values(files, ["weight_dtype=fp32"])
    enhanced = load_workflow(os.path.join(WORKFLOWS, "ernie_image_enhanced_t2i_api.json"))
    sized = set_values(enhanced, ["width=512"])  # the Primitive titled Width, which feeds two nodes
    assert sized["2"]["inputs"]["value"] == 512 and sized["3"]["inputs"]["value"] == 1024
    with pytest.raises(WorkflowError, match="2 nodes take 'seed'"):
        set_values(enhanced, ["seed=1"])
    enhanced["4"]["inputs"]["width"] = 1024  # the enhancer's width typed in again: which one is meant?
    with pytest.raises(WorkflowError, match=r"2 nodes take 'width' by input name or title \(choices: 4.width, 2.value\)"):
        set_values(enhanced, ["width=512"])
    with pytest.raises(WorkflowError, match=r"inputs you can set: .*height"):
        set_values(enhanced, ["size=512"])


def write(tmp_path, data, name="wf.json"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(p)


def test_broken_workflow_files(ernie, tmp_path):
    with pytest.raises(WorkflowError, match="not valid JSON"):
        load_workflow(write(tmp_path, "{ not json"))
    with pytest.raises(WorkflowError, match="UI-format"):
        load_workflow(write(tmp_path, {"nodes": [], "links": []}))
    with pytest.raises(WorkflowError, match="does not exist"):
        load_workflow(str(tmp_path / "missing.json"))

    base = load_workflow(os.path.join(WORKFLOWS, "ernie_image_t2i_api.json"))
    missing_type = json.loads(json.dumps(base))
    missing_type["6"]["class_type"] = "SomeOtherPackDecode"
    with pytest.raises(WorkflowError, match="unknown node type 'SomeOtherPackDecode'.*of ComfyUI's own, SaveImage, .*PrimitiveInt.*; run other nodes inside ComfyUI"):
        Runner().validate(missing_type)

    missing_input = json.loads(json.dumps(base))
    del missing_input["5"]["inputs"]["seed"]
    with pytest.raises(WorkflowError, match="required input 'seed' is missing"):
        Runner().validate(missing_input)

    wrong_wire = json.loads(json.dumps(base))
    wrong_wire["6"]["inputs"]["vae"] = ["1", 0]  # the DiT into the VAE input
    with pytest.raises(WorkflowError, match="needs LP_ERNIE_VAE but is linked to a LP_ERNIE_DIT"):
        Runner().validate(wrong_wire)

    cycle = json.loads(json.dumps(base))
    cycle["9"] = {"class_type": "LetterpressErnieImageVAEEncode", "inputs": {"vae": ["1", 2], "image": ["6", 0]}}
    cycle["5"]["inputs"]["latent"] = ["9", 0]  # sample <- encode <- decode <- sample
    with pytest.raises(WorkflowError, match="cycle"):
        Runner().validate(cycle)

    bad_file = json.loads(json.dumps(base))
    bad_file["1"]["inputs"]["folder"] = "Not-There"
    with pytest.raises(WorkflowError, match="'Not-There' is not a folder in .*download the Hugging Face repository "
                                            "baidu/ERNIE-Image into"):
        Runner().validate(bad_file)


def test_cli_reports_errors_without_traceback(ernie, models_dir, tmp_path, capsys):
    code = run_cli("ernie_image_t2i_api.json", models_dir, tmp_path, "width=40")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "40 is outside" not in err and "multiple of 16" in err


def test_unwritable_output_dir(ernie, models_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # running as root: permissions do not bind, use a path under a file instead
        ro = tmp_path / "a_file"
        ro.write_text("x")
        ro = ro / "sub"
    code = run_cli("ernie_image_turbo_t2i_api.json", models_dir, ro, *SMALL)
    assert code == 2 and "output folder" in capsys.readouterr().err


def test_load_image_reruns_when_the_file_changes(tmp_path, host):
    from PIL import Image as PILImage

    path = tmp_path / "in.png"
    PILImage.new("RGB", (16, 16), (255, 0, 0)).save(path)
    wf = {"1": {"class_type": "LoadImage", "inputs": {"image": str(path)}},
          "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    runner = Runner()
    first = runner.run(wf)["results"]["1"][0]
    runner.run(wf)
    assert runner.executed == ["2"]  # unchanged file: LoadImage cached
    PILImage.new("RGB", (16, 16), (0, 0, 255)).save(path)
    os.utime(path, (1, 1))  # a different mtime even within the same second
    second = runner.run(wf)["results"]["1"][0]
    assert runner.executed == ["1", "2"]
    assert first[0, 0, 0, 0] == 1.0 and second[0, 0, 0, 2] == 1.0


def test_cli_refuses_a_device_torch_cannot_use_before_loading(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    code = cli.main(["run", os.path.join(WORKFLOWS, "ernie_image_t2i_api.json"), "--device", "cuda:7",
                     "--models-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --device cuda:7: this torch") and "use cpu" in err.lower()


def test_cli_folders_default_to_the_environment(ernie, models_dir, tmp_path, monkeypatch, capsys):
    """Without --models-dir / --output-dir the CLI uses LETTERPRESS_MODELS_DIR / LETTERPRESS_OUTPUT_DIR."""
    from letterpress.loaders.host import get_host

    monkeypatch.setenv("LETTERPRESS_MODELS_DIR", models_dir)
    monkeypatch.setenv("LETTERPRESS_OUTPUT_DIR", str(tmp_path / "from_env"))
    monkeypatch.setenv("LETTERPRESS_INPUT_DIR", str(tmp_path / "inputs_env"))
    args = ["run", os.path.join(WORKFLOWS, "ernie_image_turbo_t2i_api.json"), "--quiet"]
    args += [a for s in SMALL for a in ("--set", s)]
    assert cli.main(args) == 0
    written = capsys.readouterr().out.split()
    assert len(written) == 1 and written[0].startswith(str(tmp_path / "from_env") + os.sep)
    assert get_host().input_dir == str(tmp_path / "inputs_env")
    assert cli.main(args + ["--output-dir", str(tmp_path / "from_flag")]) == 0  # a flag wins over the environment
    assert capsys.readouterr().out.split()[0].startswith(str(tmp_path / "from_flag") + os.sep)


def test_cli_usage_names_the_command_it_was_started_as(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/venv/bin/letterpress"])
    assert cli._parser().prog == "letterpress"
    monkeypatch.setattr("sys.argv", ["/src/letterpress/__main__.py"])
    assert cli._parser().prog == "python -m letterpress"


def test_cli_names_the_models_dir_when_nothing_is_found(tmp_path, capsys):
    code = run_cli("ernie_image_t2i_api.json", str(tmp_path / "nowhere"), tmp_path)
    err = capsys.readouterr().err
    # the missing folder is named with the repository to download and the path to put it at
    want = os.path.join(tmp_path, "nowhere", "diffusers", "ERNIE-Image")
    assert code == 2 and "(which does not exist)" in err and f"baidu/ERNIE-Image into {want}" in err


def test_non_finite_numbers_are_refused_before_running(ernie, models_dir, host):
    wf = load_workflow(os.path.join(WORKFLOWS, "ernie_image_t2i_api.json"))
    with pytest.raises(WorkflowError, match="input 'shift': expected a finite number, got nan"):
        Runner().validate(set_values(wf, ["shift=nan"]))


def test_sizes_wired_from_primitives_are_checked_before_any_model_loads(ernie, models_dir, host):
    wf = load_workflow(os.path.join(WORKFLOWS, "ernie_image_enhanced_t2i_api.json"))
    with pytest.raises(WorkflowError, match="needs width to be a positive multiple of 16, got 1000"):
        Runner().validate(set_values(wf, ["width=1000"]))
    with pytest.raises(WorkflowError, match=r"node 4 \(LetterpressErnieImagePromptEnhance\) input 'height': 9000 is outside"):
        Runner().validate(set_values(wf, ["height=9000"]))
    assert Runner().validate(set_values(wf, ["width=512"]))


def test_unreadable_input_image_and_absolute_output_prefix(tmp_path, host):
    from letterpress.core_nodes import LoadImage, save_images
    from letterpress.loaders.errors import LetterpressError

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    with pytest.raises(LetterpressError, match="notes.png is not a readable image"):
        LoadImage().load_image(str(not_an_image))
    with pytest.raises(LetterpressError, match="inside the output folder"):
        save_images(torch.zeros(1, 8, 8, 3), str(tmp_path / "out"), str(tmp_path / "elsewhere" / "x"))
    assert not (tmp_path / "elsewhere").exists()


def test_out_of_memory_names_the_node_and_the_way_out(host):
    class Hungry:
        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "run"
        OUTPUT_NODE = True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def run(self):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 68719476736 bytes.")

    from letterpress.loaders.errors import LetterpressError

    with pytest.raises(LetterpressError, match=r"Out of memory in node 1 \(Hungry\).*Lower the size or the batch"):
        Runner(nodes={"Hungry": Hungry}).run({"1": {"class_type": "Hungry", "inputs": {}}})


@pytest.mark.parametrize("workflow,size,step", [("ernie_image_t2i_api.json", 40, 16), ("glm_image_t2i_api.json", 48, 32)])
def test_a_wrong_size_is_refused_before_any_model_loads(ernie, glm, models_dir, host, workflow, size, step):
    wf = set_values(load_workflow(os.path.join(WORKFLOWS, workflow)), [f"width={size}"])
    runner = Runner()
    with pytest.raises(WorkflowError, match=f"width to be a positive multiple of {step}.*got {size}"):
        runner.run(wf)
    assert runner.executed == []


def test_odd_workflow_files_and_settings_get_clear_errors(tmp_path, monkeypatch):
    from letterpress.loaders.errors import LetterpressError
    from letterpress.loaders.host import StandaloneHost
    from letterpress.samplers.sizes import check_multiple

    with pytest.raises(WorkflowError, match="cannot be read"):
        load_workflow(str(tmp_path))  # a folder
    listed = tmp_path / "list_inputs.json"
    listed.write_text(json.dumps({"1": {"class_type": "SaveImage", "inputs": [1, 2]}}))
    with pytest.raises(WorkflowError, match="not an API-format workflow"):
        load_workflow(str(listed))
    monkeypatch.setenv("LETTERPRESS_DEVICE_BUDGET", "-5")
    with pytest.raises(LetterpressError, match="0 or more"):
        StandaloneHost()
    with pytest.raises(LetterpressError, match=r"got 8\. Use 32\.$"):
        check_multiple(8, 64, 32, "GLM-Image")


def test_checked_before_anything_runs_as_comfyui_does(ernie, models_dir, tmp_path, host):
    """A missing picture, an output prefix outside the output folder and a combo wired from a wrong output are
    refused before any model loads; a node that feeds no output is neither checked nor run."""
    host.input_dir = str(tmp_path)
    wf = load_workflow(os.path.join(WORKFLOWS, "ernie_image_inpaint_api.json"))
    with pytest.raises(WorkflowError, match="Image ernie_image_inpaint.png was not found"):
        Runner().validate(wf)
    t2i = set_values(load_workflow(os.path.join(WORKFLOWS, "ernie_image_t2i_api.json")), SMALL)
    with pytest.raises(WorkflowError, match="filename_prefix '../x' must name a file inside the output folder"):
        Runner().validate(set_values(t2i, ["filename_prefix=../x"]))
    wrong = json.loads(json.dumps(t2i))
    wrong["1"]["inputs"]["weight_dtype"] = ["4", 0]  # a LATENT into a list of choices
    with pytest.raises(WorkflowError, match="input 'weight_dtype' needs COMBO but is linked to a LATENT output"):
        Runner().validate(wrong)
    dangling = {**t2i, "9": {"class_type": "LetterpressErnieImageLoraLoader",
                             "inputs": {"dit": ["1", 0], "lora_name": "missing.safetensors", "strength": 1.0}}}
    runner = Runner()
    runner.run(dangling)
    assert "9" not in runner.executed


def test_save_image_prefix_like_comfyui(tmp_path, host):
    from letterpress.core_nodes import save_images

    images = torch.zeros(1, 8, 12, 3)
    for prefix in ("poster (v2)", "jazz, night", "a+b", "sub/%width%x%height%_%year%"):
        path = save_images(images, str(tmp_path), prefix)[0]
        assert path.startswith(str(tmp_path) + os.sep) and path.endswith("_00001_.png")
    assert os.path.basename(path).startswith("12x8_2")  # %width%, %height%, %year%


def test_load_image_reads_every_frame_and_workflow_files_with_a_bom(tmp_path, host):
    from letterpress.core_nodes import LoadImage

    frames = [Image.new("RGB", (8, 6), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    image, mask = LoadImage().load_image(str(tmp_path / "anim.gif"))
    assert image.shape == (3, 6, 8, 3) and mask.shape == (3, 6, 8)
    assert image[1, 0, 0].argmax() == 1 and image[2, 0, 0].argmax() == 2
    frames[0].save(tmp_path / "stereo.jpg", format="MPO", save_all=True, append_images=frames[1:2])
    image, _ = LoadImage().load_image(str(tmp_path / "stereo.jpg"))  # a camera's MPO: the photo, not its other view
    assert image.shape == (1, 6, 8, 3) and image[0, 0, 0].argmax() == 0
    wf = tmp_path / "bom.json"
    wf.write_bytes(b"\xef\xbb\xbf" + open(os.path.join(WORKFLOWS, "ernie_image_t2i_api.json"), "rb").read())
    assert load_workflow(str(wf))["1"]["class_type"] == "LetterpressErnieImageFolderLoader"


def test_bad_device_in_the_environment_is_a_clear_error(ernie, models_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LETTERPRESS_DEVICE", "bogus")
    assert run_cli("ernie_image_t2i_api.json", models_dir, tmp_path, *SMALL) == 2
    assert "LETTERPRESS_DEVICE=bogus: this torch" in capsys.readouterr().err
