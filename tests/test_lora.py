"""LoRA on the ERNIE-Image DiT: every format against diffusers' own LoRA loading or independently merged
weights, strength 0, stacking, bit-exact removal, and refusals of foreign LoRAs."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import save_file

from letterpress.loaders.errors import LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

PROMPT = "a poster with the words hello world in bold red letters"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK = 4


def node(name):
    return N["LetterpressErnieImage" + name]()


def random_lora(dit_module, seed, rank=RANK, layers=(0, 1)):
    """module name -> (A, B): random low-rank factors on the attention projections."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in layers:
        for t in TARGETS:
            name = f"layers.{i}.self_attention.{t}"
            w = dit_module.get_submodule(name).weight
            out[name] = (0.3 * torch.randn(rank, w.shape[1], generator=gen), 0.3 * torch.randn(w.shape[0], rank, generator=gen))
    return out


def write(models_dir, filename, tensors):
    path = os.path.join(models_dir, "loras", filename)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return filename


def peft_file(lora, alpha=None):
    t = {}
    for m, (a, b) in lora.items():
        t[f"transformer.{m}.lora_A.weight"], t[f"transformer.{m}.lora_B.weight"] = a, b
        if alpha is not None:
            t[f"transformer.{m}.alpha"] = torch.tensor(float(alpha))
    return t


def diffsynth_file(lora):
    t = {}
    for m, (a, b) in lora.items():
        t[f"{m}.lora_A.default.weight"], t[f"{m}.lora_B.default.weight"] = a, b
    return t


def comfy_file(lora, alpha):
    t = {}
    for m, (a, b) in lora.items():
        t[f"diffusion_model.{m}.lora_down.weight"], t[f"diffusion_model.{m}.lora_up.weight"] = a, b
        t[f"diffusion_model.{m}.alpha"] = torch.tensor(float(alpha))
    return t


def kohya_file(lora, alpha, prefix="lora_unet_"):
    """kohya / sd-scripts names: the layer's dots flattened to underscores."""
    t = {}
    for m, (a, b) in lora.items():
        flat = prefix + m.replace(".", "_")
        t[f"{flat}.lora_down.weight"], t[f"{flat}.lora_up.weight"] = a, b
        t[f"{flat}.alpha"] = torch.tensor(float(alpha))
    return t


@pytest.fixture(scope="module")
def setup(ernie, models_dir):
    from diffusers import ErnieImagePipeline

    pipe = ErnieImagePipeline.from_pretrained(os.path.join(models_dir, "diffusers", "ERNIE-Image"))
    pipe.set_progress_bar_config(disable=True)
    dit, te, vae, _ = node("FolderLoader").run("ERNIE-Image", "auto", False)
    one, two = random_lora(dit.module, 1), random_lora(dit.module, 2, layers=(1,))
    files = {
        "peft": write(models_dir, "peft.safetensors", peft_file(one)),
        "peft_alpha": write(models_dir, "peft_alpha.safetensors", peft_file(one, alpha=2.0)),
        "diffsynth": write(models_dir, "diffsynth.safetensors", diffsynth_file(one)),
        "comfy": write(models_dir, "comfy.safetensors", comfy_file(one, alpha=8.0)),
        "kohya": write(models_dir, "kohya.safetensors", kohya_file(one, alpha=2.0)),
        "onetrainer": write(models_dir, "onetrainer.safetensors", kohya_file(one, alpha=8.0, prefix="lora_transformer_")),
        "second": write(models_dir, "second.safetensors", diffsynth_file(two)),
    }
    return dict(pipe=pipe, dit=dit, te=te, vae=vae, one=one, two=two, files=files)


def ours(s, dit):
    pos = node("TextEncode").run(s["te"], PROMPT)[0]
    lat = node("EmptyLatent").run(32, 32, 1)[0]
    out = node("Sampler").run(dit, pos, lat, 4, 2, 1.0, 4.0, 1.0)[0]
    return node("VAEDecode").run(s["vae"], out)[0]


def reference(pipe, transformer=None):
    if transformer is not None:
        pipe = copy.copy(pipe)
        pipe.transformer = transformer
    out = pipe(PROMPT, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
               generator=torch.Generator("cpu").manual_seed(4), output_type="np", use_pe=False)
    return torch.from_numpy(out.images)


def merged(pipe, loras):
    """The reference transformer with W + s * B @ A * alpha / rank merged in, computed here."""
    t = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        for lora, strength, scale in loras:
            for m, (a, b) in lora.items():
                t.get_submodule(m).weight += strength * scale * (b @ a)
    return t


def lora(s, dit, key, strength):
    return node("LoraLoader").run(dit, s["files"][key], strength)[0]


def test_peft_format_matches_diffusers_load_lora_weights(setup):
    s = setup
    pipe = s["pipe"]
    from letterpress.loaders.files import resolve

    pipe.load_lora_weights(resolve("loras", s["files"]["peft"]), adapter_name="a")
    try:
        pipe.set_adapters(["a"], [0.7])
        ref = reference(pipe)
    finally:
        pipe.unload_lora_weights()
    got = ours(s, lora(s, s["dit"], "peft", 0.7))
    assert (got - ref).abs().max().item() <= 1e-4
    assert (got - ours(s, s["dit"])).abs().max() > 0.02  # the LoRA changes the image


@pytest.mark.parametrize("rslora", [False, True])
def test_alpha_in_diffusers_metadata_matches_diffusers(setup, models_dir, rslora):
    """A LoRA saved by diffusers' save_lora_weights with its PEFT settings (lora_alpha, alpha_pattern, use_rslora)
    in the file's metadata instead of .alpha tensors: scaled as diffusers scales it."""
    from diffusers import ErnieImagePipeline

    s, pipe = setup, setup["pipe"]
    layers = {f"{m}.lora_{side}.weight": t for m, (a, b) in s["one"].items() for side, t in (("A", a), ("B", b))}
    folder = os.path.join(models_dir, "loras", "saved_by_diffusers")
    weight_name = f"meta_{rslora}.safetensors"
    ErnieImagePipeline.save_lora_weights(folder, transformer_lora_layers=layers, weight_name=weight_name,
                                         transformer_lora_adapter_metadata={
                                             "r": RANK, "lora_alpha": 16, "alpha_pattern": {"layers.1.self_attention.to_q": 2},
                                             "target_modules": TARGETS, "use_rslora": rslora})
    pipe.load_lora_weights(os.path.join(folder, weight_name), adapter_name="m")
    try:
        pipe.set_adapters(["m"], [0.5])
        ref = reference(pipe)
    finally:
        pipe.unload_lora_weights()
    got = ours(s, node("LoraLoader").run(s["dit"], f"saved_by_diffusers/{weight_name}", 0.5)[0])
    assert (got - ref).abs().max().item() <= 1e-4
    plain = ours(s, lora(s, s["dit"], "peft", 0.5))  # the same factors at alpha = rank
    assert (got - plain).abs().max() > 0.02


@pytest.mark.parametrize("key,scale", [("peft_alpha", 2.0 / RANK), ("diffsynth", 1.0), ("comfy", 8.0 / RANK),
                                       ("kohya", 2.0 / RANK), ("onetrainer", 8.0 / RANK)])
def test_other_formats_match_merged_weights(setup, key, scale):
    s = setup
    ref = reference(s["pipe"], merged(s["pipe"], [(s["one"], 0.5, scale)]))
    got = ours(s, lora(s, s["dit"], key, 0.5))
    assert (got - ref).abs().max().item() <= 1e-4


def test_strength_zero_stacking_and_removal(setup):
    s = setup
    base = ours(s, s["dit"])
    assert torch.equal(ours(s, lora(s, s["dit"], "diffsynth", 0.0)), base)
    stacked = lora(s, lora(s, s["dit"], "diffsynth", 0.6), "second", -0.4)
    ref = reference(s["pipe"], merged(s["pipe"], [(s["one"], 0.6, 1.0), (s["two"], -0.4, 1.0)]))
    assert (ours(s, stacked) - ref).abs().max().item() <= 1e-4
    assert torch.equal(ours(s, s["dit"]), base)  # the LoRA node removed: base weights bit for bit


def test_foreign_loras_are_refused(setup, models_dir):
    s = setup
    gen = torch.Generator().manual_seed(0)
    other_family = {"transformer_blocks.0.attn.to_q": (torch.randn(4, 64, generator=gen), torch.randn(64, 4, generator=gen))}
    write(models_dir, "ovis_like.safetensors", diffsynth_file(other_family))
    with pytest.raises(LetterpressError, match="another model family.*transformer_blocks.0.attn.to_q"):
        node("LoraLoader").run(s["dit"], "ovis_like.safetensors", 1.0)
    flux_names = {"double_blocks.0.img_attn.qkv": (torch.randn(4, 64, generator=gen), torch.randn(192, 4, generator=gen))}
    write(models_dir, "flux_names.safetensors", comfy_file(flux_names, alpha=4.0))
    with pytest.raises(LetterpressError, match="another model family.*double_blocks.0.img_attn.qkv"):
        node("LoraLoader").run(s["dit"], "flux_names.safetensors", 1.0)
    te = dict(kohya_file(s["one"], alpha=4.0))
    te["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 8)
    write(models_dir, "with_te.safetensors", te)
    with pytest.raises(LetterpressError, match="also changes a text encoder.*lora_te_.*DiT only"):
        node("LoraLoader").run(s["dit"], "with_te.safetensors", 1.0)
    te = dict(peft_file(s["one"]))
    te["text_encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 8)
    write(models_dir, "with_te_peft.safetensors", te)
    with pytest.raises(LetterpressError, match=r"also changes a text encoder \(text_encoder\.layers"):
        node("LoraLoader").run(s["dit"], "with_te_peft.safetensors", 1.0)
    bigger = {"layers.0.self_attention.to_q": (torch.randn(4, 128, generator=gen), torch.randn(128, 4, generator=gen))}
    write(models_dir, "bigger.safetensors", diffsynth_file(bigger))
    with pytest.raises(LetterpressError, match=r"another size: layers.0.self_attention.to_q is \(64, 64\)"):
        node("LoraLoader").run(s["dit"], "bigger.safetensors", 1.0)
    junk = dict(diffsynth_file(s["one"]))
    junk["some.other.tensor"] = torch.zeros(3)
    write(models_dir, "junk.safetensors", junk)
    with pytest.raises(LetterpressError, match="some.other.tensor"):
        node("LoraLoader").run(s["dit"], "junk.safetensors", 1.0)


def test_shipped_lora_workflow_runs_headless(setup, models_dir, tmp_path, capsys):
    from letterpress import cli

    wf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows", "api", "ernie_image_lora_api.json")
    args = ["run", wf, "--models-dir", models_dir, "--output-dir", str(tmp_path), "--quiet"]
    for kv in ("width=32", "height=32", "steps=2", f"lora_name={setup['files']['peft']}", "strength=0.5"):
        args += ["--set", kv]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.strip().endswith("_00001_.png")


def test_patching_never_writes_to_the_checkpoint_file(setup, models_dir):
    """Weights are copy-on-write views of the file: a LoRA applied in place leaves the file as it was."""
    import hashlib

    path = os.path.join(models_dir, "diffusers", "ERNIE-Image", "transformer", "diffusion_pytorch_model.safetensors")
    before = hashlib.sha256(open(path, "rb").read()).hexdigest()
    s = setup
    patched = ours(s, lora(s, s["dit"], "diffsynth", 2.0))
    assert (patched - ours(s, s["dit"])).abs().max() > 0.02
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == before


# Ovis-Image and GLM-Image: no diffusers LoRA loader exists for them, so the reference is the DiT with the
# merged weights W + s * B @ A * alpha / rank computed here, run through the same sampler.

def _family_sample(family, dit, models):
    if family == "ovis":
        pos, _neg = N["LetterpressOvisImageTextEncode"]().run(models["te"], "a red poster", "", 64)
        lat = N["LetterpressOvisImageEmptyLatent"]().run(32, 32, 1)[0]
        return N["LetterpressOvisImageSampler"]().run(dit, pos, lat, 3, 2, 1.0, 1.0)[0]["samples"]
    prior, prompt = models["prior"]
    pos = N["LetterpressGlmImageGlyphEncode"]().run(models["glyph"], prompt)[0]
    return N["LetterpressGlmImageSampler"]().run(dit, prior, pos, 3, 2, 1.0)[0]["samples"]


@pytest.fixture(scope="module", params=["ovis", "glm"])
def family(request, ovis, glm):
    if request.param == "ovis":
        dit, te, _vae = N["LetterpressOvisImageFolderLoader"]().run("Ovis-Image-7B", "auto")
        return request.param, dit, {"te": te}
    ar, glyph, dit, _vae = N["LetterpressGlmImageFolderLoader"]().run("GLM-Image", "auto")
    prior = N["LetterpressGlmImageARTokens"]().run(ar, "a red sign that says 'open'", 64, 64, 0, 0.9, 0.75)
    return request.param, dit, {"glyph": glyph, "prior": prior}


def test_family_lora_matches_merged_weights_and_unpatches(family, models_dir):
    name, dit, models = family
    targets = [n for n, m in dit.module.named_modules() if n.endswith(("to_q", "to_k", "to_v"))][:4]
    gen = torch.Generator().manual_seed(5)
    lora = {}
    for t in targets:
        w = dit.module.get_submodule(t).weight
        lora[t] = (0.3 * torch.randn(RANK, w.shape[1], generator=gen), 0.3 * torch.randn(w.shape[0], RANK, generator=gen))
    filename = write(models_dir, f"{name}_lora.safetensors", comfy_file(lora, alpha=2.0))
    node_name = {"ovis": "LetterpressOvisImageLoraLoader", "glm": "LetterpressGlmImageLoraLoader"}[name]
    base = _family_sample(name, dit, models)
    patched = _family_sample(name, N[node_name]().run(dit, filename, 0.8)[0], models)
    from letterpress.loaders.host import get_host

    get_host().load(dit)  # the base weights back in the module before copying it
    merged_module = copy.deepcopy(dit.module)
    merged_module.__dict__.pop("_letterpress_patches", None)  # a plain module, not one the host patches
    with torch.no_grad():
        for t, (a, b) in lora.items():
            merged_module.get_submodule(t).weight += 0.8 * (2.0 / RANK) * (b @ a)
    import dataclasses

    merged = _family_sample(name, dataclasses.replace(dit, module=merged_module, patches=()), models)
    assert (patched - base).abs().max() > 1e-3  # the LoRA matters
    assert (patched - merged).abs().max().item() <= 1e-5
    assert torch.equal(_family_sample(name, dit, models), base)  # base weights back, bit for bit


def test_ovis_lora_in_original_names_matches_the_merged_original_file(ovis, models_dir):
    """Ovis-Image LoRAs named as ComfyUI's file names its layers (FLUX-style: fused qkv, linear1 = [q; k; v; mlp],
    SwiGLU up/gate halves, the final modulation's swapped halves), in ComfyUI and kohya spelling. Reference: the
    LoRA merged into the DiT's weights in those original names (where it is a plain W + s * B @ A), written as an
    original single file and loaded by the DiT loader."""
    from fixtures.ovis_image import diffusers_to_original
    from letterpress.loaders.host import get_host

    dit = N["LetterpressOvisImageDiTLoader"]().run("ovis_image.safetensors", "auto")[0]
    get_host().load(dit)
    original = {k: v.detach().clone() for k, v in diffusers_to_original(dit.module.state_dict()).items()}
    gen = torch.Generator().manual_seed(11)
    targets = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.proj", "double_blocks.1.img_mlp.up_proj",
               "double_blocks.1.txt_mlp.gate_proj", "double_blocks.1.txt_mlp.up_proj", "double_blocks.0.img_mod.lin",
               "single_blocks.0.linear1", "single_blocks.1.linear2", "final_layer.adaLN_modulation.1",
               "semantic_txt_in", "img_in"]
    lora = {t: (0.3 * torch.randn(RANK, original[t + ".weight"].shape[1], generator=gen),
                0.3 * torch.randn(original[t + ".weight"].shape[0], RANK, generator=gen)) for t in targets}
    for t, (a, b) in lora.items():
        original[t + ".weight"] += 0.7 * (2.0 / RANK) * (b @ a)
    write(models_dir, "ovis_original_names.safetensors", comfy_file(lora, alpha=2.0))
    write(models_dir, "ovis_kohya.safetensors", kohya_file(lora, alpha=2.0))
    from fixtures.common import save_single

    save_single(original, os.path.join(models_dir, "diffusion_models", "ovis_lora_merged.safetensors"))
    merged_dit = N["LetterpressOvisImageDiTLoader"]().run("ovis_lora_merged.safetensors", "auto")[0]
    models = {"te": N["LetterpressOvisImageFolderLoader"]().run("Ovis-Image-7B", "auto")[1]}
    base = _family_sample("ovis", dit, models)
    ref = _family_sample("ovis", merged_dit, models)
    assert (ref - base).abs().max() > 1e-2  # the LoRA matters
    for filename in ("ovis_original_names.safetensors", "ovis_kohya.safetensors"):
        got = _family_sample("ovis", N["LetterpressOvisImageLoraLoader"]().run(dit, filename, 0.7)[0], models)
        assert (got - ref).abs().max().item() <= 1e-5, filename
