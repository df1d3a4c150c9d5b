"""ERNIE-Image end to end and re-queue speed: the pack's staged graph against diffusers' ErnieImagePipeline,
same weights (a small-but-real random model), same settings, interleaved runs, medians, as ratios.

    python benchmarks/ernie_image_speed.py [--runs 5] [--size 256] [--steps 8]

Figures:
  end-to-end ratio   = pack graph (fresh runner: load + encode + sample + decode) / diffusers (from_pretrained + call)
  sampling ratio     = pack graph with loaded models / diffusers call with loaded pipeline
  re-queue ratio     = pack re-run with a new seed (models and encodings cached) / diffusers call (loaded pipeline)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def build_small_real(models_dir: str, seed: int = 0) -> None:
    from diffusers import AutoencoderKLFlux2, ErnieImagePipeline, ErnieImageTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from fixtures import ernie_image as fx
    from fixtures.common import reinit
    from transformers import Mistral3Config, Mistral3Model, PixtralVisionConfig

    c = fx.build_components(seed)
    cfg = fx.text_config(4).to_dict()
    cfg.update(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=32, patch_size=8, head_dim=8)
    c["text_encoder"] = reinit(Mistral3Model(Mistral3Config(text_config=cfg, vision_config=vision.to_dict())).eval(), 1)
    c["transformer"] = reinit(ErnieImageTransformer2DModel(
        hidden_size=512, num_attention_heads=8, num_layers=4, ffn_hidden_size=1536, in_channels=128, out_channels=128,
        patch_size=1, text_in_dim=256, rope_theta=256, rope_axes_dim=(16, 24, 24)).eval(), 2)
    c["vae"] = AutoencoderKLFlux2(block_out_channels=(64, 128, 128, 128), layers_per_block=1, norm_num_groups=32).eval()
    c["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=4.0)
    c["pe"] = c["pe_tokenizer"] = None
    ErnieImagePipeline(**c).save_pretrained(os.path.join(models_dir, "diffusers", "ERNIE-Image"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from diffusers import ErnieImagePipeline
    from letterpress.loaders.host import StandaloneHost, set_host
    from letterpress.runner import Runner, load_workflow, set_values

    tmp = tempfile.mkdtemp()
    build_small_real(tmp)
    host = StandaloneHost()
    host.models_dir, host.output_dir, host.show_progress = tmp, os.path.join(tmp, "out"), False
    set_host(host)
    wf_path = os.path.join(os.path.dirname(__file__), "..", "workflows", "ernie_image_t2i_api.json")
    settings = [f"width={args.size}", f"height={args.size}", f"steps={args.steps}", "cfg=4.0"]
    wf = set_values(load_workflow(wf_path), settings)
    wf["7"]["class_type"] = "PreviewImage"  # no PNG writing in the timing
    wf["7"]["inputs"].pop("filename_prefix")
    folder = os.path.join(tmp, "diffusers", "ERNIE-Image")
    prompt = wf["2"]["inputs"]["prompt"]

    def ref_call(pipe, seed):
        pipe(prompt, height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=4.0,
             generator=torch.Generator("cpu").manual_seed(seed), output_type="np", use_pe=False)

    def ref_fresh(seed):
        pipe = ErnieImagePipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        ref_call(pipe, seed)

    def ours_fresh(seed):
        Runner().run(set_values(wf, [f"seed={seed}"]))

    loaded = ErnieImagePipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    warm = Runner()
    warm.run(wf)
    ref_call(loaded, 0)  # warm-up both

    t = {"ours_fresh": [], "ref_fresh": [], "ours_requeue": [], "ref_loaded": []}
    for i in range(args.runs):
        for name, fn in (("ours_fresh", lambda: ours_fresh(i)), ("ref_fresh", lambda: ref_fresh(i)),
                         ("ours_requeue", lambda: warm.run(set_values(wf, [f"seed={100 + i}"]))),
                         ("ref_loaded", lambda: ref_call(loaded, 100 + i))):
            start = time.perf_counter()
            fn()
            t[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in t.items()}
    print(f"ERNIE-Image {args.size}x{args.size}, {args.steps} steps, CFG 4, DiT hidden 512 x 4 layers, "
          f"{args.runs} interleaved runs, medians on {torch.get_num_threads()} threads")
    for k, v in med.items():
        print(f"  {k:14s} {v:7.3f} s")
    print(f"  end-to-end ratio (pack / diffusers, fresh load)  {med['ours_fresh'] / med['ref_fresh']:.3f}  (goal <= 1.00)")
    print(f"  re-queue ratio (pack re-run / diffusers call)     {med['ours_requeue'] / med['ref_loaded']:.3f}  (goal <= 0.70)")


if __name__ == "__main__":
    main()
