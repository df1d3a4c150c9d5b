"""`run --download` against a stand-in of the Hub's file API (tests/fixtures/standin_hub.py) serving the tiny models'
files: it fetches exactly what the workflow's loaders read, resumes a file whose connection broke, and the run then
draws what it draws with the files placed by hand; without the flag nothing is fetched; failures are sentences."""

from __future__ import annotations

import errno
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
from fixtures.standin_hub import HubStandIn, repo_from_folder
from letterpress import cli
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(ROOT, "workflows", "api")
SMALL = ["width=32", "height=32", "steps=2", "prompt=a red poster"]
COMFY_FILES = ("diffusion_models/ernie-image.safetensors", "diffusion_models/ernie-image-turbo.safetensors",
               "text_encoders/ministral-3-3b.safetensors", "text_encoders/ernie-image-prompt-enhancer.safetensors",
               "vae/flux2-vae.safetensors")


@pytest.fixture
def hub(ernie, models_dir, monkeypatch):
    """The Hub with the tiny ERNIE-Image's repositories: Comfy-Org's single files and baidu's diffusers folder,
    each with files no loader reads (documents, another precision of the DiT)."""
    from huggingface_hub import constants

    folder = repo_from_folder(os.path.join(models_dir, "diffusers", "ERNIE-Image"))
    baidu = {**folder, "README.md": b"# ERNIE-Image", ".gitattributes": b"*.safetensors filter=lfs",
             "transformer/diffusion_pytorch_model.fp16.safetensors":
                 folder["transformer/diffusion_pytorch_model.safetensors"]}
    comfy = {f: Path(models_dir, f).read_bytes() for f in COMFY_FILES}
    with HubStandIn({"baidu/ERNIE-Image": baidu, "Comfy-Org/ERNIE-Image": {**comfy, "README.md": b"# files"}},
                    gated=("baidu/ERNIE-Image-Turbo",)) as server:
        # huggingface_hub reads HF_ENDPOINT once, into these two (constants.py); the runner's calls read them
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
        # http_get writes what it reads in chunks of this size (10 MB): a tiny file cut off midway has whole chunks
        # on disk to resume from only when they are smaller than the file
        monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
        server.folder = folder
        yield server


def run(workflow, models, out, *args):
    argv = ["run", os.path.join(WORKFLOWS, workflow), "--models-dir", str(models), "--output-dir", str(out), "--quiet"]
    for s in SMALL:
        argv += ["--set", s]
    return cli.main(argv + list(args))


def drawn(capsys) -> np.ndarray:
    written = capsys.readouterr().out.split()
    assert len(written) == 1
    return np.asarray(Image.open(written[0]))


def test_single_files_fetch_exactly_what_the_loaders_read_resume_a_broken_file_and_draw_the_same(
        hub, models_dir, tmp_path, capsys):
    models = tmp_path / "models"
    hub.drop_once = ("Comfy-Org/ERNIE-Image", "diffusion_models/ernie-image.safetensors")
    assert run("ernie_image_single_files_api.json", models, tmp_path / "a", "--download") == 0
    image = drawn(capsys)
    tokenizer = {("baidu/ERNIE-Image", f) for f in hub.folder if f.startswith("tokenizer/")}
    assert tokenizer and hub.downloaded() == tokenizer | {
        ("Comfy-Org/ERNIE-Image", f) for f in ("diffusion_models/ernie-image.safetensors",
                                               "text_encoders/ministral-3-3b.safetensors", "vae/flux2-vae.safetensors")}
    dit = hub.repos["Comfy-Org/ERNIE-Image"]["diffusion_models/ernie-image.safetensors"]
    resumed = [(r[2], int(r[3].removeprefix("bytes=").removesuffix("-"))) for r in hub.requests if r[0] == "GET" and r[3]]
    assert len(resumed) == 1 and resumed[0][0] == "diffusion_models/ernie-image.safetensors"
    assert 0 < resumed[0][1] <= len(dit) // 2  # went on from the whole chunks it had of the half sent, not from 0
    assert (models / "diffusion_models" / "ernie-image.safetensors").read_bytes() == dit
    # the tokenizer beside the file, where the single-file loader looks; no download leftovers in models/
    assert sorted(os.listdir(models / "text_encoders" / "ministral-3-3b")) == sorted(
        f.split("/")[1] for _, f in tokenizer)
    assert not [d for kind in ("diffusion_models", "text_encoders", "vae") for d in os.listdir(models / kind)
                if d.startswith(".")]
    assert run("ernie_image_single_files_api.json", models_dir, tmp_path / "b") == 0
    np.testing.assert_array_equal(image, drawn(capsys))  # the files placed by hand draw the same
    before = len(hub.requests)
    assert run("ernie_image_single_files_api.json", models, tmp_path / "c", "--download") == 0
    assert len(hub.requests) == before  # everything there: nothing asked of the Hub


def readme_main_command() -> list[str]:
    """The arguments of README's main command (the first set-up command: pip install ... && python -m letterpress)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        line = next(x for x in f if x.startswith("pip install -e . && python -m letterpress run "))
    return shlex.split(line.split("&& python -m letterpress ", 1)[1])


def test_readme_main_command_fetches_only_the_subfolders_its_folder_loader_reads(hub, models_dir, tmp_path, capsys,
                                                                                monkeypatch):
    """README's main command, as printed, on an empty models folder (a fresh machine) with the Hub at hand."""
    models = tmp_path / "models"
    argv = readme_main_command()
    assert "--download" in argv
    argv[argv.index("--models-dir") + 1] = str(models)
    small = [x for s in SMALL[:3] for x in ("--set", s)]
    monkeypatch.chdir(ROOT)  # the command names the workflow relative to the clone
    assert cli.main(argv + small + ["--output-dir", str(tmp_path / "a"), "--quiet"]) == 0
    image = drawn(capsys)
    # not the prompt enhancer (switched off in this workflow), the scheduler (ERNIE-Image's shift is an input),
    # the fp16 copy of the DiT or the documents
    unread = ("pe/", "pe_tokenizer/", "scheduler/")
    assert hub.downloaded() == {("baidu/ERNIE-Image", f) for f in hub.folder if not f.startswith(unread)}
    prompt = argv[argv.index("--set") + 1]
    assert cli.main(argv[:2] + ["--models-dir", models_dir, "--set", prompt] + small +
                    ["--output-dir", str(tmp_path / "b"), "--quiet"]) == 0
    np.testing.assert_array_equal(image, drawn(capsys))


def test_without_the_flag_nothing_is_fetched_and_the_error_says_what_to_download(hub, tmp_path, capsys):
    assert run("ernie_image_single_files_api.json", tmp_path / "models", tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert "The ERNIE-Image DiT Loader needs an ERNIE-Image DiT file: download diffusion_models/ernie-image.safetensors " \
           "from the Hugging Face repository Comfy-Org/ERNIE-Image" in err
    assert err.rstrip().endswith("Run again with --download to fetch the missing model files from the Hugging Face Hub.")
    assert hub.requests == []


def test_the_whole_workflow_is_checked_before_anything_is_fetched(hub, tmp_path, capsys):
    assert run("ernie_image_single_files_api.json", tmp_path / "models", tmp_path / "a", "--download",
               "--set", "seed=-1") == 2
    assert "node 5 (LetterpressErnieImageSampler) input 'seed': -1 is outside" in capsys.readouterr().err
    assert hub.requests == []


@pytest.mark.parametrize("case, expected", [
    ("gated", ("Downloading ERNIE-Image-Turbo from baidu/ERNIE-Image-Turbo failed: baidu/ERNIE-Image-Turbo is a gated "
               "repository. Accept its conditions on {endpoint}/baidu/ERNIE-Image-Turbo while logged in, then log in "
               "here (hf auth login) or set HF_TOKEN, and run again.")),
    ("missing", ("Downloading ERNIE-Image-Turbo DiT from Comfy-Org/ERNIE-Image failed: Comfy-Org/ERNIE-Image has no "
                 "diffusion_models/ernie-image-turbo.safetensors (HTTP 404): the repository changed.")),
    ("offline", ("Downloading Flux2 VAE from Comfy-Org/ERNIE-Image failed: the Hugging Face Hub (http://127.0.0.1:9) "
                 "cannot be reached from this machine (ConnectError: [Errno 111] Connection refused). Check the internet "
                 "connection (and HTTPS_PROXY if you need a proxy). Run the same command again: the download goes on "
                 "where it stopped. Or download vae/flux2-vae.safetensors from the Hugging Face repository "
                 "Comfy-Org/ERNIE-Image to ")),
    ("disk full", "Downloading Flux2 VAE from Comfy-Org/ERNIE-Image failed: the disk holding "),
])
def test_a_failed_download_is_one_sentence_naming_the_repository_and_what_to_do(
        hub, tmp_path, capsys, monkeypatch, case, expected):
    from huggingface_hub import constants

    workflow, sets = "ernie_image_single_files_api.json", []
    if case == "gated":
        workflow = "ernie_image_turbo_t2i_api.json"
    if case == "missing":
        del hub.repos["Comfy-Org/ERNIE-Image"]["diffusion_models/ernie-image-turbo.safetensors"]
        sets = ["--set", "dit_name=ernie-image-turbo.safetensors"]
    if case == "offline":  # a port nothing listens on
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    if case == "disk full":
        import huggingface_hub.file_download as fd

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(fd, "http_get", full)
    assert run(workflow, tmp_path / "models", tmp_path / "a", "--download", *sets) == 2
    err = capsys.readouterr().err
    assert "\nerror: " + expected.format(endpoint=hub.endpoint) in err, err
    assert "Traceback" not in err and err.count("error: ") == 1


def test_every_model_file_of_every_shipped_workflow_can_be_downloaded(tmp_path, host):
    """In an empty models folder, each loader of each shipped workflow has what it reads planned from the sources
    table, but the LoRA (yours to pick): the README's promise that --download works from zero."""
    from letterpress.loaders.download import plan
    from letterpress.runner import Runner, load_workflow

    host.models_dir = str(tmp_path / "models")
    runner = Runner()
    for name in sorted(os.listdir(WORKFLOWS)):
        wf = load_workflow(os.path.join(WORKFLOWS, name))
        wanted = plan(wf, runner.nodes, runner.order(wf))
        loaders = {nid for nid in runner.order(wf) if wf[nid]["class_type"].endswith("Loader")
                   and "Lora" not in wf[nid]["class_type"]}
        assert set(wanted) == loaders, name
        assert all(f.repo and f.patterns for fs in wanted.values() for f in fs)


# (loader node, its file under text_encoders, the family's diffusers folder, the subfolder its tokenizer is in there)
SINGLE_FILE_TOKENIZERS = {
    "ERNIE-Image text encoder": ("LetterpressErnieImageTextEncoderLoader", "ministral-3-3b.safetensors",
                                 "ERNIE-Image", "tokenizer"),
    "ERNIE-Image prompt enhancer": ("LetterpressErnieImagePromptEnhancerLoader",
                                    "ernie-image-prompt-enhancer.safetensors", "ERNIE-Image", "pe_tokenizer"),
    "Ovis-Image text encoder": ("LetterpressOvisImageTextEncoderLoader", "ovis_2.5.safetensors", "Ovis-Image-7B",
                                "tokenizer"),
}


def _place_tokenizer(where: str, models_src: str, models: Path, name: str, folder: str, sub: str) -> None:
    """The tokenizer of the file `name` put where a user might have it (copied from the tiny diffusers folders)."""
    import shutil

    stem = models / "text_encoders" / os.path.splitext(name)[0]
    own = os.path.join(models_src, "diffusers", folder)
    other = os.path.join(models_src, "diffusers", "Ovis-Image-7B" if folder == "ERNIE-Image" else "ERNIE-Image")
    if where == "beside":
        shutil.copytree(os.path.join(own, sub), stem)
    elif where == "beside_tokenizer":
        shutil.copytree(os.path.join(own, sub), f"{stem}_tokenizer")
    elif where == "beside_tokenizer_json_only":
        stem.mkdir()
        shutil.copy(os.path.join(own, sub, "tokenizer.json"), stem)
    elif where in ("family_folder", "other_family_folder"):
        src = own if where == "family_folder" else other
        dst = models / "diffusers" / os.path.basename(src)
        dst.mkdir(parents=True)
        shutil.copy(os.path.join(src, "model_index.json"), dst)
        shutil.copytree(os.path.join(own, sub), dst / sub)  # the right tokenizer, in whichever model's folder
    else:
        assert where == "nowhere"


@pytest.mark.parametrize("stage", sorted(SINGLE_FILE_TOKENIZERS))
@pytest.mark.parametrize("where", ["nowhere", "beside", "beside_tokenizer", "beside_tokenizer_json_only",
                                   "family_folder", "other_family_folder"])
def test_download_fetches_a_tokenizer_exactly_when_the_loader_finds_none(stage, where, ernie, ovis, models_dir,
                                                                       tmp_path, host):
    """`run --download` plans the tokenizer of a single-file text encoder when, and only when, the loader itself
    (run on the same models folder) finds none: both ask the family's SPEC.tokenizer_folders and llm.holds_tokenizer."""
    import shutil

    from letterpress.loaders.download import plan
    from letterpress.loaders.errors import LetterpressError
    from letterpress.nodes import NODE_CLASS_MAPPINGS

    node, name, folder, sub = SINGLE_FILE_TOKENIZERS[stage]
    models = tmp_path / "models"
    (models / "text_encoders").mkdir(parents=True)
    shutil.copy(os.path.join(models_dir, "text_encoders", name), models / "text_encoders")
    _place_tokenizer(where, models_dir, models, name, folder, sub)
    host.models_dir = str(models)
    cls = NODE_CLASS_MAPPINGS[node]
    wanted = plan({"1": {"class_type": node, "inputs": {cls.INPUT: name, "weight_dtype": "fp32"}}}, {node: cls}, ["1"])
    fetches_tokenizer = any(f.what.startswith("the tokenizer") for f in wanted.get("1", []))
    try:
        cls().run(name, "fp32")
        loader_found = True
    except LetterpressError as e:  # a tokenizer found but incomplete (only tokenizer.json) is named as such
        loader_found = "no tokenizer found" not in str(e)
    assert fetches_tokenizer == (not loader_found)
    # the cases themselves: the family's own folders are where both look, another model's folder is not
    assert loader_found == (where not in ("nowhere", "other_family_folder"))
