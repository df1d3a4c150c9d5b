"""Torch Compile nodes: the compiled DiT draws what the eager one draws, is compiled once and reused, always
computes with the current weights when a LoRA changes them in place, and does not keep a dropped model alive."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch._dynamo.utils import counters

from letterpress.loaders.compiled import ran_compiled
from letterpress.nodes import NODE_CLASS_MAPPINGS as N
from test_lora import _family_sample, comfy_file, random_lora, write

PROMPT = "a poster with the words hello world in bold red letters"


def ernie_sample(dit, te, seed=4):
    pos = N["LetterpressErnieImageTextEncode"]().run(te, PROMPT)[0]
    neg = N["LetterpressErnieImageTextEncode"]().run(te, "")[0]
    lat = N["LetterpressErnieImageEmptyLatent"]().run(32, 48, 1)[0]
    return N["LetterpressErnieImageSampler"]().run(dit, pos, lat, seed, 3, 3.0, 4.0, 1.0, neg)[0]["samples"]


def close(a, b, rel=1e-4):
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


def test_compiled_ernie_dit_matches_eager_and_follows_lora_changes(ernie, models_dir):
    dit, te, _vae, _pe = N["LetterpressErnieImageFolderLoader"]().run("ERNIE-Image", "auto", False)
    compile_node = N["LetterpressErnieImageCompile"]()
    compiled = compile_node.run(dit, "default")[0]
    assert compiled.module is dit.module and dit.compile is None  # the input handle is left as it was

    base = ernie_sample(dit, te)
    assert not ran_compiled(dit.module)
    assert close(ernie_sample(compiled, te), base)
    assert ran_compiled(dit.module)  # the sampler took the compiled path
    graphs = counters["stats"]["unique_graphs"]
    other_seed = ernie_sample(compiled, te, seed=9)
    assert counters["stats"]["unique_graphs"] == graphs  # a re-queue with a new seed reuses the compiled code
    assert close(other_seed, ernie_sample(dit, te, seed=9))

    lora_file = write(models_dir, "compile_lora.safetensors", comfy_file(random_lora(dit.module, 7), alpha=4.0))
    with_lora = N["LetterpressErnieImageLoraLoader"]().run(dit, lora_file, 1.0)[0]
    eager_lora = ernie_sample(with_lora, te)
    assert (eager_lora - base).abs().max() > 1e-2 * base.abs().max()  # the LoRA changes the image
    compiled_lora = compile_node.run(with_lora, "default")[0]
    assert close(ernie_sample(compiled_lora, te), eager_lora)  # not the frozen base weights
    assert close(ernie_sample(compiled, te), base)  # and back: not the frozen LoRA weights


def test_a_compiled_dit_is_freed_when_dropped(ernie):
    """Nothing the compile path keeps refers to the model: dropping the last handle frees it at once (no
    reference cycle waiting for the garbage collector), so reloading a model does not pile up old copies."""
    dit, te, _vae, _pe = N["LetterpressErnieImageFolderLoader"]().run("ERNIE-Image", "auto", False)
    compiled = N["LetterpressErnieImageCompile"]().run(dit, "default")[0]
    ernie_sample(compiled, te)
    gone = weakref.ref(dit.module)
    gc.disable()
    try:
        del dit, compiled
        assert gone() is None
    finally:
        gc.enable()


def test_unknown_compile_mode_is_refused(ernie):
    from letterpress.loaders.errors import LetterpressError

    dit = N["LetterpressErnieImageFolderLoader"]().run("ERNIE-Image", "auto", False)[0]
    with pytest.raises(LetterpressError, match="compile mode"):
        N["LetterpressErnieImageCompile"]().run(dit, "fastest")


@pytest.mark.parametrize("name", ["ovis", "glm"])
def test_compiled_ovis_and_glm_dits_match_eager(name, ovis, glm):
    if name == "ovis":
        dit, te, _vae = N["LetterpressOvisImageFolderLoader"]().run("Ovis-Image-7B", "auto")
        models = {"te": te}
    else:
        ar, glyph, dit, _vae = N["LetterpressGlmImageFolderLoader"]().run("GLM-Image", "auto")
        prior = N["LetterpressGlmImageARTokens"]().run(ar, "a red sign that says 'open'", 64, 64, 0, 0.9, 0.75)
        models = {"glyph": glyph, "prior": prior}
    title = {"ovis": "Ovis", "glm": "Glm"}[name]
    compiled = N[f"Letterpress{title}ImageCompile"]().run(dit, "default")[0]
    eager = _family_sample(name, dit, models)
    assert eager.abs().max() > 0
    assert close(_family_sample(name, compiled, models), eager)
    assert ran_compiled(dit.module)


def test_a_failing_compiler_gives_a_clear_error(ernie, tmp_path, monkeypatch):
    import torch._inductor.config as inductor

    from letterpress.loaders.errors import LetterpressError

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # nothing compiled earlier can be reused
    torch._dynamo.reset()
    dit, te, _vae, _pe = N["LetterpressErnieImageFolderLoader"]().run("ERNIE-Image", "auto", False)
    compiled = N["LetterpressErnieImageCompile"]().run(dit, "default")[0]
    with inductor.patch({"cpp.cxx": ("letterpress-no-such-compiler",), "fx_graph_cache": False}):
        with pytest.raises(LetterpressError, match="Remove the Torch Compile node"):
            ernie_sample(compiled, te)
    torch._dynamo.reset()
