"""Real-size memory accounting without a GPU: each model's real architecture is built on the meta device
(no memory), and each stage's weight bytes are counted in bf16 and with fp8 weight storage (Linear
weights in fp8, the rest bf16, as weight_dtype fp8_e4m3fn loads them). The pack runs one stage at a
time (the host offloads the others), so the resident peak is the largest stage plus its activations.

    python benchmarks/real_size_accounting.py [--size 1024]

Activations are estimates (stated per stage below), not measurements: a GPU is needed for those.
"""

from __future__ import annotations

import argparse

import torch

GB = 1e9


def weight_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(bf16 bytes, fp8-storage bytes) for a module built on the meta device."""
    total = sum(p.numel() for p in module.parameters())
    linear = sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
    return 2 * total, 2 * total - linear


def on_meta(factory):
    with torch.device("meta"):
        return factory()


def ministral3_3b():
    from transformers import Ministral3Config, Ministral3Model

    return Ministral3Model(Ministral3Config(vocab_size=131072, hidden_size=3072, intermediate_size=9216,
                                            num_hidden_layers=26, num_attention_heads=32, num_key_value_heads=8,
                                            head_dim=128, tie_word_embeddings=True))


def qwen3_2b():
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                  num_attention_heads=16, num_key_value_heads=8, head_dim=128))


def dit_activations(batch: int, tokens: int, hidden: int, ffn: int) -> float:
    """Largest per-layer working set: q, k, v, attention out and the two MLP halves, bf16, flash attention."""
    return batch * tokens * (4 * hidden + 2 * ffn) * 2


def vae_decode_activations(size: int, widest: int = 128, live: int = 6) -> float:
    """Full-resolution decoder blocks: `live` feature maps of `widest` channels at size x size, bf16."""
    return size * size * widest * live * 2


def models(size: int):
    from diffusers import (AutoencoderKL, AutoencoderKLFlux2, ErnieImageTransformer2DModel,
                           GlmImageTransformer2DModel, OvisImageTransformer2DModel)
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration, T5Config, T5EncoderModel

    t16 = (size // 16) ** 2
    return {
        "ERNIE-Image": ("published: '24 GB' claimed, 34.9 GB measured elsewhere", [
            ("text encoder (Ministral-3 3B)", lambda: ministral3_3b(), 512 * 3072 * 2 * 8),
            ("DiT (8B)", lambda: ErnieImageTransformer2DModel(hidden_size=4096, num_attention_heads=32, num_layers=36,
                                                              ffn_hidden_size=12288, text_in_dim=3072),
             dit_activations(2, t16 + 512, 4096, 12288)),
            ("VAE decode (Flux2)", lambda: AutoencoderKLFlux2(), vae_decode_activations(size)),
        ]),
        "Ovis-Image": ("published: 24.3 GB peak at 1024^2 (H100, bf16)", [
            ("text encoder (Qwen3 2B)", lambda: qwen3_2b(), 284 * 2048 * 2 * 8),
            ("DiT (7B)", lambda: OvisImageTransformer2DModel(), dit_activations(1, t16 + 256, 3072, 12288)),
            ("VAE decode (FLUX.1)", lambda: AutoencoderKL(latent_channels=16, block_out_channels=(128, 256, 512, 512)),
             vae_decode_activations(size)),
        ]),
        "GLM-Image": ("published: 37.8 GB peak at 1024^2 (H100, diffusers)", [
            ("AR generator (9B + ViT + VQ)", lambda: GlmImageForConditionalGeneration(GlmImageConfig()),
             # KV cache: 40 layers x 2 KV heads x 128 x (prefix + 256 + 1024 tokens) x k,v, bf16
             40 * 2 * 128 * 2 * 2 * (512 + 256 + t16 // 4 * 4)),
            ("glyph encoder (ByT5)", lambda: T5EncoderModel(T5Config(vocab_size=384, d_model=1472, d_ff=3584, d_kv=64,
                                                                     num_layers=12, num_heads=6)), 2048 * 1472 * 2 * 8),
            ("DiT (7B)", lambda: GlmImageTransformer2DModel(num_attention_heads=32, attention_head_dim=128),
             dit_activations(1, (size // 16) ** 2 + 512, 4096, 4 * 4096)),
            ("VAE decode (16 ch)", lambda: AutoencoderKL(latent_channels=16, block_out_channels=(128, 256, 512, 512)),
             vae_decode_activations(size)),
        ]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args()
    budget = 24 * GB
    print(f"Real-size accounting at {args.size}x{args.size}; GB = 1e9 bytes; activations are estimates")
    for name, (published, stages) in models(args.size).items():
        print(f"\n{name}  ({published})")
        rows = []
        for stage, factory, act in stages:
            bf16, fp8 = weight_bytes(on_meta(factory))
            rows.append((stage, bf16, fp8, act))
            print(f"  {stage:32s} weights bf16 {bf16 / GB:6.2f} | fp8 storage {fp8 / GB:6.2f} | activations ~{act / GB:5.2f}")
        all_bf16 = sum(r[1] for r in rows)
        peak_bf16 = max(r[1] + r[3] for r in rows)
        peak_fp8 = max(r[2] + r[3] for r in rows)
        big = max(rows, key=lambda r: r[1] + r[3])
        print(f"  all stages resident at once (no staging), bf16 weights: {all_bf16 / GB:6.2f}")
        print(f"  staged peak (one stage at a time), bf16: {peak_bf16 / GB:6.2f}  [{big[0]}]  "
              f"{'fits' if peak_bf16 <= budget else 'EXCEEDS'} 24 GB")
        dit = next(r for r in rows if r[0].startswith("DiT"))
        print(f"  staged peak with fp8 weight storage:     {peak_fp8 / GB:6.2f}  "
              f"(DiT weights {dit[2] / dit[1]:.2f} x bf16)")


if __name__ == "__main__":
    main()
