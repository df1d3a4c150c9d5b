"""Real-size memory accounting without a GPU: each model's real architecture is built on the meta device
(no memory), and each stage's weight bytes are counted in bf16, with fp8 weight storage (Linear
weights in fp8, the rest bf16, as weight_dtype fp8_e4m3fn loads them) and as GGUF Q8_0 / Q4_K files load
(Linear weights kept packed, the rest bf16). The pack runs one stage at a
time (the host offloads the others), so the resident peak is the largest stage plus its activations.

    python benchmarks/real_size_accounting.py [--size 1024] [--training]

Activations are measured without memory: the stage's real module runs one forward in bf16 under torch's
FakeTensorMode (shapes only), and a dispatch mode adds up the bytes of every tensor the forward creates while it
is alive (freed when Python drops it, as eager execution frees it). That is the peak of live activations as
torch allocates them (flash attention on CPU, as on a GPU); allocator caching, fragmentation and kernel
workspaces are not in it. The GLM-Image AR stage is the exception: its KV cache is computed from the config.
"""

from __future__ import annotations

import argparse
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

GB = 1e9


# GGUF block sizes: (weights per block, bytes per block), as ggml defines them.
GGUF_BLOCKS = {"Q8_0": (32, 34), "Q4_K": (256, 144)}


def weight_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(bf16 bytes, fp8-storage bytes) for a module built on the meta device."""
    total = sum(p.numel() for p in module.parameters())
    linear = sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
    return 2 * total, 2 * total - linear


def gguf_bytes(module: torch.nn.Module, qtype: str) -> int:
    """Bytes of the module's weights in a GGUF file of `qtype` as the pack keeps them: each Linear weight whose rows
    are whole blocks stays packed (the type's bytes per block), everything else is held in bf16."""
    per_block, block_bytes = GGUF_BLOCKS[qtype]
    total = 2 * sum(p.numel() for p in module.parameters())
    for m in module.modules():
        if isinstance(m, torch.nn.Linear) and m.weight.shape[1] % per_block == 0:
            n = m.weight.numel()
            total += n // per_block * block_bytes - 2 * n
    return total


def quantized_at_load_bytes(module: torch.nn.Module, choice: str) -> int:
    """Bytes of a stage loaded with weight_dtype `choice` (Q8_0, Q4_0, ...): the Linear weights loaders/quantize.py
    packs (2-D, rows of whole 32-value blocks, more than 1024 values, not tied to an embedding) in the type's bytes,
    everything else in bf16, as on a GPU."""
    from letterpress.loaders import quantize

    qtype = quantize.TYPES[choice]
    total = 2 * sum(p.numel() for p in module.parameters())
    embedded = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    for m in module.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, torch.nn.Linear) and id(w) not in embedded and quantize.packs(tuple(w.shape), qtype):
            total += quantize.packed_size(tuple(w.shape), qtype) - 2 * w.numel()
    return total


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


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that operators create while this mode is active. A storage counts once however
    many tensors view it, and stops counting when the last of them is gone."""

    def __init__(self, weights: torch.nn.Module | None = None):
        super().__init__()
        self.live = self.peak = 0
        self.users: dict[int, list] = {}  # storage key -> [tensors alive on it, bytes]
        # Weights are counted apart: an operator handing out a view of one (a transpose in a linear) adds nothing.
        self.weights = {t.untyped_storage()._cdata for t in (*weights.parameters(), *weights.buffers())} if weights else set()

    def _drop(self, key: int) -> None:
        entry = self.users[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.users[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key in self.weights:
                    continue
                if key in self.users:
                    self.users[key][0] += 1
                else:
                    self.users[key] = [1, storage.nbytes()]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._drop, key)
        return out


def _bf16_module(factory) -> torch.nn.Module:
    """The module `factory` builds, in bf16 (inside FakeTensorMode: shapes only), in eval mode."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        return factory().eval()
    finally:
        torch.set_default_dtype(torch.float32)


def fake_forward_peak(factory, forward) -> tuple[int, int, int]:
    """(bf16 weight bytes, fp8-storage weight bytes, peak live activation bytes) of one forward of the real-size
    module, run on fake tensors in bf16."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        module = _bf16_module(factory)
        tracker = LiveBytes(module)
        with torch.no_grad(), tracker:
            forward(module)
    return (*weight_bytes(module), tracker.peak)


def _bf16(*shape):
    return torch.randn(*shape, dtype=torch.bfloat16)


def _ids(*shape):
    return torch.zeros(*shape, dtype=torch.long)


def models(size: int):
    """Per model: published figure, and stages as (name, factory, forward on fake inputs or a byte count)."""
    from diffusers import (AutoencoderKL, AutoencoderKLFlux2, ErnieImageTransformer2DModel,
                           GlmImageTransformer2DModel, OvisImageTransformer2DModel)
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration, T5Config, T5EncoderModel

    lat8, img16 = size // 8, (size // 16) ** 2  # VAE latent side; image tokens after the 2x2 patch
    flux_vae = lambda: AutoencoderKL(  # noqa: E731  (the FLUX.1 VAE's config; GLM-Image's has the same shape)
        latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False)
    glm_ar = GlmImageConfig()
    text = glm_ar.text_config
    kv_tokens = 512 + img16 // 4 + img16  # prompt, the preview grid, the target grid (AR tokens are 32 px)
    head_dim = text.hidden_size // text.num_attention_heads
    kv_cache = text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * kv_tokens * 2  # k and v, bf16
    return {
        "ERNIE-Image": ("published: '24 GB' claimed, 34.9 GB measured elsewhere", [
            ("text encoder (Ministral-3 3B)", ministral3_3b,
             lambda m: m(input_ids=_ids(1, 512), output_hidden_states=True)),
            ("DiT (8B), CFG batch of 2", lambda: ErnieImageTransformer2DModel(
                hidden_size=4096, num_attention_heads=32, num_layers=36, ffn_hidden_size=12288, text_in_dim=3072),
             lambda m: m(hidden_states=_bf16(2, 128, size // 16, size // 16), timestep=_bf16(2),
                         text_bth=_bf16(2, 512, 3072), text_lens=torch.tensor([8, 512]), return_dict=False)),
            ("VAE decode (Flux2)", AutoencoderKLFlux2, lambda m: m.decode(_bf16(1, 32, lat8, lat8))),
        ]),
        "Ovis-Image": ("published: 24.3 GB peak at 1024^2 (H100, bf16)", [
            ("text encoder (Qwen3 2B)", qwen3_2b, lambda m: m(input_ids=_ids(1, 284), attention_mask=_ids(1, 284) + 1)),
            ("DiT (7B), one CFG pass", OvisImageTransformer2DModel,
             lambda m: m(hidden_states=_bf16(1, img16, 64), timestep=_bf16(1), encoder_hidden_states=_bf16(1, 284, 2048),
                         txt_ids=torch.zeros(284, 3), img_ids=torch.zeros(img16, 3), return_dict=False)),
            ("VAE decode (FLUX.1)", flux_vae, lambda m: m.decode(_bf16(1, 16, lat8, lat8))),
        ]),
        "GLM-Image": ("published: 37.8 GB peak at 1024^2 (H100, diffusers)", [
            ("AR generator (9B + ViT + VQ), KV cache", lambda: GlmImageForConditionalGeneration(glm_ar), kv_cache),
            ("glyph encoder (ByT5)", lambda: T5EncoderModel(T5Config(vocab_size=384, d_model=1472, d_ff=3584, d_kv=64,
                                                                     num_layers=12, num_heads=6)),
             lambda m: m(input_ids=_ids(1, 512))),
            ("DiT (7B), one CFG pass", lambda: GlmImageTransformer2DModel(num_attention_heads=32, attention_head_dim=128),
             # prior_token_drop as an empty index: the conditional pass (a boolean mask needs nonzero, which
             # fake tensors cannot size)
             lambda m: m(hidden_states=_bf16(1, 16, lat8, lat8), encoder_hidden_states=_bf16(1, 64, 1472),
                         prior_token_id=_ids(1, img16), prior_token_drop=_ids(0), timestep=torch.tensor([500.0]),
                         target_size=torch.tensor([[float(size), float(size)]]), crop_coords=torch.zeros(1, 2),
                         return_dict=False)),
            ("VAE decode (16 ch)", flux_vae, lambda m: m.decode(_bf16(1, 16, lat8, lat8))),
        ]),
    }


def fake_training_peak(factory, forward, rank: int = 16, layers: str = "attention") -> tuple[int, int, int, int]:
    """(bf16 weight bytes, fp8-storage weight bytes, LoRA bytes with its gradients and AdamW state, peak live bytes
    of activations and gradients) of one LoRA training step of the real-size DiT (batch 1), run on fake tensors in
    bf16: the pack's LoRA layers (lora_training.LoraLayer hooks, fp32) on the chosen layers, gradient checkpointing
    of the blocks, forward, MSE loss, backward."""
    from letterpress.samplers import lora_training as training

    with FakeTensorMode(allow_non_fake_inputs=True):
        module = _bf16_module(factory)
        module.requires_grad_(False)
        module.enable_gradient_checkpointing()
        lora_bytes = 0
        for name in training.target_layers(module, layers):
            layer = module.get_submodule(name)
            ad = training.LoraLayer(layer.in_features, layer.out_features, rank, 1.0, "cpu")
            layer.register_forward_hook(ad.hook)
            lora_bytes += 4 * 4 * (ad.lora_A.numel() + ad.lora_B.numel())  # fp32 weights, grads, AdamW's two moments
        tracker = LiveBytes(module)
        with torch.enable_grad(), tracker:
            out = forward(module)[0]
            loss = (out.float() ** 2).mean()
            loss.backward()
    return (*weight_bytes(module), lora_bytes, tracker.peak)


def training_models(size: int):
    """Per family: its DiT and one training step's forward (batch 1, the caption's text at the sampler's length)."""
    from diffusers import ErnieImageTransformer2DModel, GlmImageTransformer2DModel, OvisImageTransformer2DModel

    lat8, img16 = size // 8, (size // 16) ** 2
    return {
        "ERNIE-Image DiT (8B)": (lambda: ErnieImageTransformer2DModel(
            hidden_size=4096, num_attention_heads=32, num_layers=36, ffn_hidden_size=12288, text_in_dim=3072),
            lambda m: m(hidden_states=_bf16(1, 128, size // 16, size // 16), timestep=_bf16(1),
                        text_bth=_bf16(1, 512, 3072), text_lens=torch.tensor([512]), return_dict=False)),
        "Ovis-Image DiT (7B)": (OvisImageTransformer2DModel,
            lambda m: m(hidden_states=_bf16(1, img16, 64), timestep=_bf16(1), encoder_hidden_states=_bf16(1, 256, 2048),
                        txt_ids=torch.zeros(256, 3), img_ids=torch.zeros(img16, 3), return_dict=False)),
        "GLM-Image DiT (7B)": (lambda: GlmImageTransformer2DModel(num_attention_heads=32, attention_head_dim=128),
            lambda m: m(hidden_states=_bf16(1, 16, lat8, lat8), encoder_hidden_states=_bf16(1, 64, 1472),
                        prior_token_id=_ids(1, img16), prior_token_drop=_ids(0), timestep=torch.tensor([500.0]),
                        target_size=torch.tensor([[float(size), float(size)]]), crop_coords=torch.zeros(1, 2),
                        return_dict=False)),
    }


def largest_block_bytes(module: torch.nn.Module) -> int:
    """bf16 bytes of the largest transformer block (an element of one of the module's ModuleLists)."""
    return max(2 * sum(p.numel() for p in block.parameters())
               for child in module.children() if isinstance(child, torch.nn.ModuleList) for block in child)


CARDS = ((12, "12 GB"), (16, "16 GB"), (24, "24 GB"), (48, "48 GB"), (80, "80 GB"))


def card_for(total: int) -> str:
    """The smallest card that holds `total` plus 1 GB (CUDA context, allocator slack)."""
    return next((label for gb, label in CARDS if total + GB <= gb * GB), "more than 80 GB")


def training_report(size: int) -> None:
    print(f"LoRA training step at {size}x{size} (batch 1, rank 16 on the attention layers, gradient checkpointing); "
          "GB = 1e9 bytes; text encoder and VAE unloaded (their outputs cached); fp8 / GGUF bases add one block's "
          "weights dequantized to bf16 (held while that block's backward runs)")
    for name, (factory, forward) in training_models(size).items():
        bf16, fp8, lora, act = fake_training_peak(factory, forward)
        q4 = gguf_bytes(on_meta(factory), "Q4_K")
        print(f"  {name:22s} LoRA + grads + AdamW {lora / GB:5.2f} | activations + grads peak {act / GB:5.2f}")
        block = largest_block_bytes(on_meta(factory))
        for label, weights in (("bf16", bf16), ("fp8 storage", fp8), ("GGUF Q4_K", q4)):
            # fp8 / quantized: the backward of the block being recomputed holds its weights dequantized to bf16
            total = weights + lora + act + (block if weights != bf16 else 0)
            print(f"      {label:12s} base {weights / GB:6.2f} -> step {total / GB:6.2f}  fits a {card_for(total)} card")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--training", action="store_true", help="the memory of a LoRA training step per DiT instead")
    args = ap.parse_args()
    if args.training:
        training_report(args.size)
        return
    budget = 24 * GB
    print(f"Real-size accounting at {args.size}x{args.size}; GB = 1e9 bytes; activations: peak live bytes of one "
          "bf16 forward on fake tensors (GLM-Image AR: its KV cache, from the config)")
    for name, (published, stages) in models(args.size).items():
        print(f"\n{name}  ({published})")
        rows = []
        for stage, factory, forward in stages:
            if callable(forward):
                bf16, fp8, act = fake_forward_peak(factory, forward)
            else:
                (bf16, fp8), act = weight_bytes(on_meta(factory)), forward
            module = on_meta(factory)
            q8, q4 = gguf_bytes(module, "Q8_0"), gguf_bytes(module, "Q4_K")
            # quantized at load (every stage's weight_dtype Q8_0 / Q4_0); ByT5 stays in the compute dtype
            at_load = [bf16 if "ByT5" in stage else quantized_at_load_bytes(module, c) for c in ("Q8_0", "Q4_0")]
            rows.append((stage, bf16, fp8, act, q8, q4, *at_load))
            print(f"  {stage:40s} weights bf16 {bf16 / GB:6.2f} | fp8 storage {fp8 / GB:6.2f} | "
                  f"GGUF Q8_0 {q8 / GB:6.2f} | Q4_K {q4 / GB:6.2f} | quantized at load Q8_0 {at_load[0] / GB:6.2f} | "
                  f"Q4_0 {at_load[1] / GB:6.2f} | activations {act / GB:5.2f}")
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
        for column, label in ((4, "Q8_0"), (5, "Q4_K")):
            # a GGUF DiT with the other stages in bf16 (what a 12 GB user runs: quantized DiT, stock encoders)
            peak = max((r[column] if r is dit else r[1]) + r[3] for r in rows)
            print(f"  staged peak with a GGUF {label} DiT:        {peak / GB:6.2f}  "
                  f"(DiT weights {dit[column] / GB:.2f} GB = {dit[column] / dit[1]:.2f} x bf16)")
        for column, label in ((6, "Q8_0"), (7, "Q4_0")):
            big = max(rows, key=lambda r: r[column] + r[3])
            peak = big[column] + big[3]
            print(f"  staged peak, every stage quantized at load to {label}: {peak / GB:6.2f}  [{big[0]}]  "
                  f"{card_for(peak)}")


if __name__ == "__main__":
    main()
