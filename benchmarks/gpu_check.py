"""GPU check, for whoever has one: each image model at real size with random weights, one image per family, the pack
beside diffusers' pipeline with `enable_model_cpu_offload()` on the same weights.

    python benchmarks/gpu_check.py                       # real size, 1024x1024, on the CUDA device
    python benchmarks/gpu_check.py --families ernie --storage bf16,Q8_0 --steps 8
    python benchmarks/gpu_check.py --tiny                # the same code on the test suite's tiny models, on CPU

For each family (ERNIE-Image, Ovis-Image, GLM-Image) the script builds the reference pipeline with the real
architectures (configs as in real_size_accounting.py; the test fixtures' small tokenizers, so no download), fills
it with random weights (bf16), saves it under WORK/models/diffusers/<repo folder> as a Hugging Face download is laid
out, and writes the DiT as GGUF files (Q8_0 by gguf's own quantizer; Q4_K as random blocks in ggml's documented
layout, since gguf-py has no K-quant quantizer: that row measures speed and memory only). It then draws one image
per weight storage through the pack's shipped API workflow (headless runner, standalone host on the GPU: one stage
on the device at a time, as ComfyUI's low-VRAM mode keeps them) and one with the pipeline, and prints per row:
seconds per DiT step (median of the step-to-step times, the first step left out), peak VRAM
(`torch.cuda.max_memory_allocated`, reset before each run), wall time, and the largest pixel difference from the
reference's image (bf16: near 0; fp8 and Q8_0: quantization noise; Q4_K: different weights, not comparable).

Needs one NVIDIA GPU with 24 GB or more, about 2x the largest model in CPU RAM (64 GB is comfortable: the 9B
GLM-Image AR model is built in bf16 on the CPU) and ~80 GB free disk under --work. GLM-Image has no single-file DiT
loader in the pack (diffusers layout only), so its GGUF rows are skipped and said so. The --tiny mode runs on CPU in
a few seconds; the test suite runs it, so the code paths here are exercised even where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the fixtures' tokenizers and tiny models

STORAGES = ("bf16", "fp8", "Q8_0", "Q4_K")
WEIGHT_DTYPE = {"bf16": "bf16", "fp8": "fp8_e4m3fn", "Q8_0": "auto", "Q4_K": "auto"}
AT_LOAD = {"Q8_0 at load": "Q8_0", "Q4_0 at load": "Q4_0"}  # every stage of the folder quantized as it loads


@dataclass
class Family:
    label: str
    folder: str  # under models/diffusers/, the Hugging Face repo's name
    pipeline: str  # diffusers class
    workflow: str  # under workflows/api/
    loader_node: str  # the folder loader's node id in that workflow
    sampler_node: str
    decode_node: str
    dit_loader: str | None  # single-file DiT loader class (GGUF rows), None when the pack has none
    dit_output: int  # the folder loader's DiT output slot
    components: Callable[[bool], dict]  # tiny -> pipeline components
    reference: Callable  # (pipe, size, steps, seed, callback) -> images


# Components: the fixtures' tiny models, or the same pipeline with the real architectures ---------------------------


def _random(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    from fixtures.common import reinit

    with torch.no_grad():
        return reinit(module, seed, std=0.02).eval()


def _bf16(factory: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    torch.set_default_dtype(torch.bfloat16)
    try:
        return _random(factory(), seed)
    finally:
        torch.set_default_dtype(torch.float32)


def ernie_components(tiny: bool) -> dict:
    from fixtures import ernie_image as fx

    c = fx.build_components(0)
    c["pe"] = c["pe_tokenizer"] = None
    if tiny:
        return c
    from diffusers import AutoencoderKLFlux2, ErnieImageTransformer2DModel
    from transformers import Mistral3Config, Mistral3Model

    # Ministral-3 3B (real_size_accounting.ministral3_3b's sizes) inside the pipeline's Mistral3Model wrapper
    te_cfg = Mistral3Config(text_config=_ministral_text_config(), vision_config=c["text_encoder"].config.vision_config.to_dict())
    c["text_encoder"] = _bf16(lambda: Mistral3Model(te_cfg), 1)
    c["transformer"] = _bf16(lambda: ErnieImageTransformer2DModel(
        hidden_size=4096, num_attention_heads=32, num_layers=36, ffn_hidden_size=12288, text_in_dim=3072), 2)
    c["vae"] = AutoencoderKLFlux2().to(torch.bfloat16).eval()
    return c


def _ministral_text_config() -> dict:
    from fixtures import ernie_image as fx

    cfg = fx.text_config().to_dict()
    cfg.update(vocab_size=131072, hidden_size=3072, intermediate_size=9216, num_hidden_layers=26,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    return cfg


def ovis_components(tiny: bool) -> dict:
    from fixtures import ovis_image as fx

    c = fx.build_components(0)
    if tiny:
        return c
    from diffusers import AutoencoderKL, OvisImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    cfg = fx.text_config().to_dict()
    cfg.update(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
               num_attention_heads=16, num_key_value_heads=8, head_dim=128, layer_types=["full_attention"] * 28)
    c["text_encoder"] = _bf16(lambda: Qwen3Model(Qwen3Config(**cfg)), 1)
    c["transformer"] = _bf16(OvisImageTransformer2DModel, 2)
    c["vae"] = AutoencoderKL(
        latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    ).to(torch.bfloat16).eval()
    return c


def glm_components(tiny: bool) -> dict:
    from fixtures import glm_image as fx

    c = fx.build_components(0)
    if tiny:
        return c
    from diffusers import AutoencoderKL, GlmImageTransformer2DModel
    from transformers import GlmImageConfig, T5Config, T5EncoderModel

    real = GlmImageConfig().text_config
    torch.set_default_dtype(torch.bfloat16)
    try:  # the real text sizes over the fixture's token layout (its tokenizer and processor stay consistent)
        c["vision_language_encoder"] = fx.ar_model(
            2, hidden_size=real.hidden_size, intermediate_size=real.intermediate_size,
            num_hidden_layers=real.num_hidden_layers, num_attention_heads=real.num_attention_heads,
            num_key_value_heads=real.num_key_value_heads, max_position_embeddings=real.max_position_embeddings)
    finally:
        torch.set_default_dtype(torch.float32)
    c["text_encoder"] = _bf16(lambda: T5EncoderModel(T5Config(
        vocab_size=384, d_model=1472, d_ff=3584, d_kv=64, num_layers=12, num_heads=6, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, use_cache=False)), 1)
    c["transformer"] = _bf16(lambda: GlmImageTransformer2DModel(
        num_attention_heads=32, attention_head_dim=128, prior_vq_quantizer_codebook_size=fx.CODEBOOK), 3)
    old = c["vae"].config
    c["vae"] = AutoencoderKL(
        latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latents_mean=old.latents_mean, latents_std=old.latents_std).to(torch.bfloat16).eval()
    return c


def _gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _ernie_reference(guidance: float) -> Callable:
    return lambda pipe, size, steps, seed, cb: pipe(
        "a poster", height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
        generator=_gen(seed), output_type="np", use_pe=False, callback_on_step_end=cb).images


def _folder(key: str, name: str) -> tuple[str, str, str]:
    """(label, folder, pipeline class) of a family's folder source `name`, from the registry (its SPEC.sources)."""
    from letterpress.loaders import families

    s = families.get(key).folder(name)
    return s.model, s.name, s.pipeline


FAMILIES = {
    "ernie": Family(*_folder("ernie_image", "ERNIE-Image"), "ernie_image_t2i_api.json", "1", "5", "6",
                    "LetterpressErnieImageDiTLoader", 0, ernie_components, _ernie_reference(4.0)),
    # ERNIE-Image-Turbo: the same architecture, its own workflow (8 steps, no negative prompt, guidance 1)
    "ernie_turbo": Family(*_folder("ernie_image", "ERNIE-Image-Turbo"), "ernie_image_turbo_t2i_api.json",
                          "1", "5", "6", "LetterpressErnieImageDiTLoader", 0, ernie_components, _ernie_reference(1.0)),
    "ovis": Family(*_folder("ovis_image", "Ovis-Image-7B"), "ovis_image_t2i_api.json", "1", "4", "5",
                   "LetterpressOvisImageDiTLoader", 0, ovis_components,
                   lambda pipe, size, steps, seed, cb: pipe(
                       "a poster", negative_prompt="", height=size, width=size, num_inference_steps=steps,
                       guidance_scale=5.0, generator=_gen(seed), output_type="np", max_sequence_length=256,
                       callback_on_step_end=cb).images),
    "glm": Family(*_folder("glm_image", "GLM-Image"), "glm_image_t2i_api.json", "1", "6", "7", None, 2,
                  glm_components,
                  lambda pipe, size, steps, seed, cb: pipe(
                      "a poster", height=size, width=size, num_inference_steps=steps, guidance_scale=1.5,
                      generator=_gen(seed), output_type="np", callback_on_step_end=cb).images),
}


# Files -------------------------------------------------------------------------------------------------------------


def write_gguf(state: dict, path: str, qtype_name: str) -> None:
    """The DiT as a GGUF file as ComfyUI-GGUF lays one out (`model.diffusion_model.` names, 2-D weights whose rows are
    whole blocks quantized, the rest F32), written tensor by tensor."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "letterpress_bench")
    for key, value in state.items():
        name = "model.diffusion_model." + key
        if value.ndim == 2 and value.shape[1] % block == 0:
            if qtype_name == "Q4_K":  # random blocks: the weights' values are not read
                writer.add_tensor(name, random_q4_k(rng, tuple(value.shape)), raw_dtype=qtype)
            else:
                writer.add_tensor(name, gguf.quants.quantize(value.detach().float().numpy(), qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, value.detach().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_q4_k(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random Q4_K blocks (ggml's block_q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of
    4-bit quants) whose values stay within about +-0.03, like the bf16 weights'."""
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(0.03 / (63 * 15)).tobytes(), np.uint8)
    blocks[..., 2:4] = np.frombuffer(np.float16(0.015 / 63).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


# Runs --------------------------------------------------------------------------------------------------------------


class StepClock:
    """Times of the DiT's steps: the pack reports each step to the host's progress listeners, the pipeline to its
    step-end callback."""

    def __init__(self, steps: int):
        self.steps, self.times = steps, []

    def pack_listener(self, done: int, total: int) -> None:
        if total == self.steps:
            self.times.append(time.perf_counter())

    def pipeline_callback(self, pipe, step, timestep, kwargs):
        self.times.append(time.perf_counter())
        return {}

    def per_step(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return statistics.median(gaps) if gaps else float("nan")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")


def run_reference(fam: Family, models_dir: str, size: int, steps: int, seed: int, device: str) -> dict:
    import diffusers

    pipe = getattr(diffusers, fam.pipeline).from_pretrained(os.path.join(models_dir, "diffusers", fam.folder),
                                                            torch_dtype=torch.bfloat16 if device != "cpu" else None)
    pipe.set_progress_bar_config(disable=True)
    if device != "cpu":
        pipe.enable_model_cpu_offload()
    clock = StepClock(steps)
    _reset_peak()
    start = time.perf_counter()
    images = fam.reference(pipe, size, steps, seed, clock.pipeline_callback)
    _sync()
    out = {"wall": time.perf_counter() - start, "step": clock.per_step(), "peak": _peak_gb(),
           "image": torch.from_numpy(np.asarray(images)).float()}
    del pipe
    return out


def pack_workflow(fam: Family, storage: str, size: int, steps: int, seed: int, dit_file: str | None,
                  tiny: bool = False) -> dict:
    from letterpress.runner import load_workflow, set_values

    wf = load_workflow(os.path.join(HERE, "..", "workflows", "api", fam.workflow))
    # --tiny: the pack computes in fp32 as the reference does on CPU, so the image difference checks the harness
    wf[fam.loader_node]["inputs"]["weight_dtype"] = (AT_LOAD[storage] if storage in AT_LOAD
                                                     else "auto" if tiny else WEIGHT_DTYPE[storage])
    for node in wf.values():
        inputs = node["inputs"]
        for key in ("width", "height"):
            if isinstance(inputs.get(key), int):
                inputs[key] = size
        if "steps" in inputs:
            inputs["steps"] = steps
        if "seed" in inputs:
            inputs["seed"] = seed
        if isinstance(inputs.get("prompt"), str) and inputs["prompt"]:  # the positive prompt; negatives stay ""
            inputs["prompt"] = "a poster"
    if dit_file:  # the DiT from the GGUF file instead of the folder's
        wf["900"] = {"class_type": fam.dit_loader, "inputs": {"dit_name": dit_file, "weight_dtype": "auto"}}
        wf[fam.sampler_node]["inputs"]["dit"] = ["900", 0]
    return set_values(wf, [])


def run_pack(fam: Family, storage: str, size: int, steps: int, seed: int, dit_file: str | None,
             tiny: bool = False) -> dict:
    from letterpress.loaders.host import get_host
    from letterpress.runner import Runner

    host = get_host()
    clock = StepClock(steps)
    host.progress_listeners.append(clock.pack_listener)
    try:
        wf = pack_workflow(fam, storage, size, steps, seed, dit_file, tiny)
        _reset_peak()
        start = time.perf_counter()
        results = Runner().run(wf)["results"]
        _sync()
        wall = time.perf_counter() - start
    finally:
        host.progress_listeners.remove(clock.pack_listener)
    return {"wall": wall, "step": clock.per_step(), "peak": _peak_gb(), "image": results[fam.decode_node][0].float()}


def build_folder(key: str, tiny: bool, models_dir: str) -> dict | None:
    """The family's pipeline with random weights saved under models_dir/diffusers/<repo folder> (kept when already
    there); returns the DiT's state dict when it was built now (for the GGUF files), else None."""
    import diffusers

    fam = FAMILIES[key]
    folder = os.path.join(models_dir, "diffusers", fam.folder)
    print(f"\n{fam.label}: building {'tiny' if tiny else 'real-size'} random weights under {folder}", flush=True)
    if os.path.isdir(folder):
        return None
    components = fam.components(tiny)
    getattr(diffusers, fam.pipeline)(**components).save_pretrained(folder)
    return components["transformer"].state_dict()


def gguf_dit(key: str, storage: str, models_dir: str, dit_state: dict | None) -> str:
    """The family's DiT as a GGUF file of `storage` (Q8_0, Q4_K) under models_dir/diffusion_models (written unless
    there); returns its name as the DiT loaders list it."""
    fam = FAMILIES[key]
    dit_file = f"{key}-bench-{storage}.gguf"
    path = os.path.join(models_dir, "diffusion_models", dit_file)
    if not os.path.exists(path):
        if dit_state is None:  # a re-run over a kept --work folder: the folder's DiT, read back
            import diffusers

            pipe = getattr(diffusers, fam.pipeline).from_pretrained(os.path.join(models_dir, "diffusers", fam.folder))
            dit_state = pipe.transformer.state_dict()
            del pipe
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_gguf(dit_state, path, storage)
    return dit_file


def check_family(key: str, args, work: str) -> list[tuple]:
    from letterpress.loaders.host import StandaloneHost, set_host

    fam = FAMILIES[key]
    models_dir = os.path.join(work, "models")
    dit_state = build_folder(key, args.tiny, models_dir)
    host = StandaloneHost()
    host.models_dir, host.output_dir, host.show_progress = models_dir, os.path.join(work, "output"), False
    set_host(host)
    ref = run_reference(fam, models_dir, args.size, args.steps, args.seed, args.device)
    rows = [(fam.label, "diffusers cpu_offload (bf16)", ref["step"], ref["peak"], ref["wall"], 0.0)]
    for storage in args.storage:
        dit_file = None
        if storage in ("Q8_0", "Q4_K"):
            if fam.dit_loader is None:
                rows.append((fam.label, f"pack {storage}", None, None, None, "skipped: no single-file DiT loader"))
                continue
            dit_file = gguf_dit(key, storage, models_dir, dit_state)
        out = run_pack(fam, storage, args.size, args.steps, args.seed, dit_file, args.tiny)
        diff = (out["image"] - ref["image"]).abs().max().item()
        rows.append((fam.label, f"pack {storage}", out["step"], out["peak"], out["wall"], diff))
    return rows


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return "n/a" if value != value else format(value, spec)  # NaN: no CUDA peak on CPU


def main(argv: list[str] | None = None) -> list[tuple]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="ernie,ovis,glm")
    parser.add_argument("--storage", default=",".join(STORAGES), help="bf16,fp8,Q8_0,Q4_K")
    parser.add_argument("--size", type=int, default=None, help="image side (1024; --tiny: 32)")
    parser.add_argument("--steps", type=int, default=None, help="DiT steps (10; --tiny: 3)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--work", default=None, help="where the models are written (kept for re-runs)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny models on CPU (a smoke run)")
    args = parser.parse_args(argv)
    args.size = args.size or (32 if args.tiny else 1024)
    args.steps = args.steps or (3 if args.tiny else 10)
    args.storage = [s for s in args.storage.split(",") if s]
    unknown = [s for s in args.storage if s not in STORAGES]
    if unknown:
        parser.error(f"unknown storage {unknown}; choose from {', '.join(STORAGES)}")
    if args.tiny:
        args.device = "cpu"
        os.environ["LETTERPRESS_DEVICE"] = "cpu"
        args.storage = [s for s in args.storage if s != "fp8"]  # fp8 storage computes in bf16: a GPU row
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on an NVIDIA GPU (24 GB or more), or use --tiny for the CPU smoke run")
        args.device = "cuda"
        os.environ.setdefault("LETTERPRESS_DEVICE", "cuda")
    work = args.work or tempfile.mkdtemp(prefix="lp_gpu_check_")
    rows = []
    for key in [f for f in args.families.split(",") if f]:
        rows += check_family(key, args, work)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "CPU (--tiny)"
    print(f"\n{name}, {args.size}x{args.size}, {args.steps} steps, torch {torch.__version__}")
    print(f"{'model':<12} {'run':<30} {'s/step':>8} {'peak VRAM GB':>13} {'wall s':>8}  max |image - reference|")
    for label, run, step, peak, wall, diff in rows:
        print(f"{label:<12} {run:<30} {_fmt(step, '.3f'):>8} {_fmt(peak, '.2f'):>13} {_fmt(wall, '.1f'):>8}  "
              f"{_fmt(diff, '.4f')}")
    print(json.dumps({"rows": [list(r) for r in rows]}, default=str))
    return rows


if __name__ == "__main__":
    main()
