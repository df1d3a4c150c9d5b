"""Faults and long runs: an interrupted run leaves nothing behind, a failed load leaves no half model,
and many runs in one process hold steady memory and at most the host's budget of models."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest
import torch

from letterpress.loaders.errors import Interrupted, LetterpressError
from letterpress.runner import Runner, load_workflow, set_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(ROOT, "workflows", "api")
SMALL = ["width=32", "height=32", "steps=1"]


def workflow(name, *sets):
    return set_values(load_workflow(os.path.join(WORKFLOWS, name)), [*SMALL, *sets])


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def live(cls) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is cls)


# The host's budget ------------------------------------------------------------------------------


def test_host_keeps_stages_within_its_budget_and_keeps_none_alive(ernie, host):
    from letterpress.nodes import NODE_CLASS_MAPPINGS as N

    dit, te, vae, _ = N["LetterpressErnieImageFolderLoader"]().run("ERNIE-Image", "auto", False)
    size = lambda h: sum(t.numel() * t.element_size() for t in (*h.module.parameters(), *h.module.buffers()))  # noqa: E731
    assert host.device_budget == 0  # default: only the stages of the current load
    host.load(te)
    host.load(dit)
    assert host.loaded_models() == [dit.describe()] and host.loaded_bytes() == size(dit)
    host.device_budget = size(dit) + size(vae)
    host.load(vae)
    assert host.loaded_models() == [dit.describe(), vae.describe()]
    host.load(te)  # te does not fit beside both: the least recently used (dit) leaves first
    assert host.loaded_models()[-1] == te.describe() and dit.describe() not in host.loaded_models()
    assert host.loaded_bytes() <= host.device_budget
    host.load(dit)
    host.load(vae)
    assert host.loaded_models() == [dit.describe(), vae.describe()]
    assert host.loaded_bytes() <= host.device_budget
    host.load(vae, memory_required=size(dit))  # the decode's activations need the room the DiT holds
    assert host.loaded_models() == [vae.describe()]
    del dit, te, vae
    gc.collect()
    assert host.loaded_models() == []  # the host never keeps a model alive by itself


# Soak -------------------------------------------------------------------------------------------


def soak(runs: int, warmup: int = 4, report=None, sets=()) -> dict:
    """Alternate ERNIE-Image-Turbo and Ovis-Image workflows through one Runner; RSS after warm-up.
    (benchmarks/soak.py runs the long version.)"""
    from diffusers import ErnieImageTransformer2DModel, OvisImageTransformer2DModel

    from letterpress.loaders.host import get_host

    host = get_host()
    flows = [workflow("ernie_image_turbo_t2i_api.json", *sets), workflow("ovis_image_t2i_api.json", "cfg=1.0", *sets)]
    runner = Runner()
    rss, held, dits = [], [], []
    for i in range(runs):
        wf = set_values(flows[i % 2], [f"seed={i}"])
        runner.run(wf)
        rss.append(rss_bytes())
        held.append((len(host.loaded_models()), host.loaded_bytes()))
        if i + 1 == warmup or i + 1 == runs:
            dits.append(live(ErnieImageTransformer2DModel) + live(OvisImageTransformer2DModel))
            rss[-1] = rss_bytes()  # after live()'s collection: the baseline holds no garbage either
        if report:
            report(i, rss[-1], held[-1])
    base = rss[warmup - 1]
    return dict(base=base, peak_after=max(rss[warmup:]), last=rss[-1], growth=max(rss[warmup:]) / base - 1, rss=rss,
                max_held=max(n for n, _ in held), max_held_bytes=max(b for _, b in held),
                budget=host.device_budget, dits=dits)


@pytest.mark.soak
def test_soak_alternating_families_holds_memory_and_models(ernie, ovis, host):
    """30 runs in one process, ERNIE-Image and Ovis-Image alternating (tiny models, 32px, 1 step): resident
    memory after warm-up stays within 5%, the host holds at most one load's stages (budget 0) and no
    DiT outlives the runs that use it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # toy matmuls gain nothing from a second (shared) core
    try:
        r = soak(30)
    finally:
        torch.set_num_threads(before)
    assert r["growth"] <= 0.05, r
    assert r["max_held"] <= 3 and r["max_held_bytes"] > 0, r  # the largest load asks for 1 stage at a time
    assert r["dits"][1] <= r["dits"][0], r  # no DiT piles up across runs


# Interrupt: nothing leaks into the next run --------------------------------------------------------

ERNIE = ["ernie_image_t2i_api.json", "steps=4", "seed=3"]
ERNIE_LORA = ["ernie_image_lora_api.json", "steps=4", "seed=3"]
GLM = ["glm_image_t2i_api.json", "steps=2", "2.seed=4", "6.seed=4"]
FRESH = r"""
import json, sys, torch
torch.set_num_threads(1)
from letterpress.loaders.host import StandaloneHost, set_host
from letterpress.runner import Runner
models, out, jobs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
host = StandaloneHost(); host.models_dir = models; host.output_dir = out; host.show_progress = False; set_host(host)
saved = {}
for name, (wf, node) in jobs.items():
    saved[name] = Runner().run(wf)["results"][node][0]
torch.save(saved, out + "/fresh.pt")
"""


@pytest.fixture(scope="module")
def fresh(shipped_models, models_dir, tmp_path_factory, one_thread):
    """The images (and GLM prior) the workflows give in a fresh process with the same seeds."""
    out = str(tmp_path_factory.mktemp("fresh"))
    jobs = {"ernie": (workflow(*ERNIE), "6"), "glm": (workflow(*GLM), "7"), "glm_prior": (workflow(*GLM), "2")}
    subprocess.run([sys.executable, "-c", FRESH, models_dir, out, json.dumps(jobs)], check=True, timeout=900,
                   capture_output=True)
    return torch.load(os.path.join(out, "fresh.pt"), weights_only=False)


def interrupt_at(host, step):
    """Ask for Cancel from the progress bar when it reaches `step` (once), as the UI's Cancel button would."""
    fired = []

    def listener(done, total):
        if done == step and not fired:
            fired.append(total)
            host.request_interrupt()

    host.progress_listeners.append(listener)
    return fired


def pngs(folder):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".png"))


def test_interrupted_sampling_leaks_nothing_into_the_next_run(fresh, host):
    """Cancel mid-sampling (with a LoRA patched in, then without): the next run in the same process gives the
    image a fresh process gives, bit for bit; no image was written, the global RNG was not touched."""
    runner, rng = Runner(), torch.random.get_rng_state()
    fired = interrupt_at(host, 2)
    with pytest.raises(Interrupted):
        runner.run(workflow(*ERNIE_LORA))
    assert fired == [4] and pngs(host.output_dir) == []
    fired.clear()
    with pytest.raises(Interrupted):
        runner.run(workflow(*ERNIE))  # the same cached DiT module, LoRA weights still in it
    assert fired == [4] and pngs(host.output_dir) == []
    host.progress_listeners.clear()
    host.request_interrupt()  # a Cancel pressed after the run ended does not stop the next one
    out = runner.run(workflow(*ERNIE))
    assert torch.equal(out["results"]["6"][0], fresh["ernie"])
    assert len(pngs(host.output_dir)) == 1
    assert torch.equal(torch.random.get_rng_state(), rng)
    # and with the LoRA again, the same as before: the cancelled LoRA run left no trace either way
    with_lora = runner.run(workflow(*ERNIE_LORA))["results"]["6"][0]
    assert not torch.equal(with_lora, fresh["ernie"])
    assert torch.equal(runner.run(workflow(*ERNIE))["results"]["6"][0], fresh["ernie"])


def test_interrupted_ar_generation_leaks_nothing_into_the_next_run(fresh, host):
    """Cancel GLM-Image AR Tokens mid-generation: the next run gives the fresh process's tokens and image."""
    runner, rng = Runner(), torch.random.get_rng_state()
    fired = interrupt_at(host, 3)
    with pytest.raises(Interrupted):
        runner.run(workflow(*GLM))
    assert fired and fired[0] > 3 and pngs(host.output_dir) == []  # stopped inside the AR stage
    host.progress_listeners.clear()
    out = runner.run(workflow(*GLM))
    assert torch.equal(out["results"]["2"][0].generated, fresh["glm_prior"].generated)
    assert torch.equal(out["results"]["7"][0], fresh["glm"])
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_a_failed_image_write_leaves_no_partial_file(ernie, host, monkeypatch):
    from PIL import Image

    def disk_full(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n partial")
        raise OSError(28, "No space left on device")

    runner = Runner()
    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(LetterpressError, match="Cannot write .*_00001_.png: No space left on device"):
        runner.run(workflow("ernie_image_turbo_t2i_api.json"))
    assert pngs(host.output_dir) == []
    monkeypatch.undo()
    written = runner.run(workflow("ernie_image_turbo_t2i_api.json"))["outputs"]["7"]["images"]
    assert [os.path.basename(i["path"]) for i in written] == ["ernie_image_turbo_00001_.png"]


# A load that fails halfway -----------------------------------------------------------------------


def mappings_of(path) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if line.rstrip().endswith(os.path.realpath(path))]


def corrupt_copy(good, bad):
    """A copy whose header is intact and whose data from the middle to three quarters of the file reads 0xFF
    (NaN as fp32/bf16/fp16), as from a failing disk or a badly resumed download."""
    data = bytearray(open(good, "rb").read())
    a, b = len(data) // 2, len(data) * 3 // 4
    data[a:b] = b"\xff" * (b - a)
    with open(bad, "wb") as f:
        f.write(data)


def test_a_load_that_fails_halfway_leaves_nothing_behind(ernie, models_dir, tmp_path, host):
    tree = tmp_path / "models"
    (tree / "diffusion_models").mkdir(parents=True)
    for kind in ("text_encoders", "vae", "diffusers"):
        os.symlink(os.path.join(models_dir, kind), tree / kind)
    good = os.path.join(models_dir, "diffusion_models", "ernie-image.safetensors")
    os.symlink(good, tree / "diffusion_models" / "ernie-image.safetensors")
    bad = tree / "diffusion_models" / "ernie-image-bad.safetensors"
    corrupt_copy(good, bad)
    host.models_dir = str(tree)

    runner = Runner()
    wf = workflow("ernie_image_single_files_api.json", "dit_name=ernie-image-bad.safetensors", "steps=2")
    with pytest.raises(LetterpressError, match="ERNIE-Image DiT: tensor .* in ernie-image-bad.safetensors holds "
                                               "NaN/inf values: the file is corrupt.*Download it again") as err:
        runner.run(wf)
    # While the error (and its traceback) is still held: no mapping of the bad file, no model, no cache entry.
    assert mappings_of(bad) == []
    assert not [x for out in runner.cache.values() for x in out if "bad" in str(getattr(x, "source", ""))]
    assert not any("bad" in m for m in host.loaded_models())
    del err
    out = runner.run(set_values(wf, ["dit_name=ernie-image.safetensors"]))
    assert out["results"]["6"][0].shape == (1, 32, 32, 3)
    # A file cut short mid-data is refused before anything is mapped.
    cut = tree / "diffusion_models" / "ernie-image-cut.safetensors"
    cut.write_bytes(open(good, "rb").read()[: os.path.getsize(good) // 2])
    with pytest.raises(LetterpressError, match="truncated"):
        runner.run(set_values(wf, ["dit_name=ernie-image-cut.safetensors"]))
    assert mappings_of(cut) == []


@pytest.mark.parametrize("node_id,file", [("LetterpressOvisImageDiTLoader", "ovis_image.safetensors"),
                                          ("LetterpressErnieImageVAELoader", "flux2-vae.safetensors")])
def test_other_loaders_leave_no_mapping_after_a_corrupt_file(ernie, ovis, models_dir, tmp_path, host, node_id, file):
    from letterpress.nodes import NODE_CLASS_MAPPINGS as N

    kind = N[node_id].KIND
    (tmp_path / kind).mkdir()
    bad = tmp_path / kind / ("bad-" + file)
    corrupt_copy(os.path.join(models_dir, kind, file), bad)
    host.models_dir = str(tmp_path)
    with pytest.raises(LetterpressError, match="holds NaN/inf values: the file is corrupt") as err:
        N[node_id]().run(bad.name, "auto")
    assert err.value.__traceback__ is not None and mappings_of(bad) == []  # while the traceback is still held
