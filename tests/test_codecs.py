"""Quantized formats are codecs (loaders/packed.py) and readers are checkpoint views (loaders/checkpoint.py): a format
the pack has never seen, given as one codec class and read through one view, loads into packed layers that compute
with its dequantized weight; its rows split and join packed where the codec says so; GGUF's and ComfyUI's codecs
name their formats; and a plain mapping passed to the loader is a view with the protocol's defaults."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from letterpress.loaders import checkpoint, layers
from letterpress.loaders.errors import LetterpressError
from letterpress.loaders.packed import Codec, Packed, cat_rows, split_rows
from letterpress.loaders.stage import choose_layers
from letterpress.loaders.storage import Storage
from letterpress.loaders.weights import build_empty, fill_module


@dataclass(frozen=True)
class RowInt8(Codec):
    """A made-up format: int8 values with one float32 scale per row (the `row_scale` side tensor)."""

    def describe(self) -> str:
        return "row-int8"

    def dequantize(self, raw, shape, extras, dtype):
        return (raw.float() * extras["row_scale"].reshape(-1, 1)).reshape(shape).to(dtype)

    def rows(self, packed, index):
        raw, scale = packed.raw[index], packed.extras["row_scale"][index]
        return Packed(raw, self, (raw.shape[0], *packed.shape[1:]), {"row_scale": scale})


def row_int8(w: torch.Tensor) -> tuple[Packed, torch.Tensor]:
    """`w` in RowInt8, and the weight it stands for (computed here, not by the codec)."""
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / scale.reshape(-1, 1)).to(torch.int8)
    return Packed(q, RowInt8(), tuple(w.shape), {"row_scale": scale}), q.float() * scale.reshape(-1, 1)


class Made(checkpoint.CheckpointView):
    """A reader of the made-up format: one view, only `__getitem__`, `names` and `quantized` written."""

    quantized = True

    def __init__(self, tensors: dict):
        self.tensors, self.source = tensors, "made.rowint8"

    def __getitem__(self, key):
        return self.tensors[key]

    def names(self):
        return self.tensors.keys()


def test_a_new_format_is_one_codec_and_one_view(host):
    gen = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(48, 64, generator=gen), torch.randn(48, generator=gen), torch.randn(5, 64, generator=gen)
    packed, weight = row_int8(w)
    made = Made({"0.weight": packed, "0.bias": b})
    module = build_empty(lambda: torch.nn.Sequential(torch.nn.Linear(64, 48)))
    choose_layers(module, Storage(), packed=made.quantized)
    fill_module(module, made, what="made-up model")
    layer = module[0]
    assert layers.is_packed(layer) and layer.pack_codec == RowInt8() and layer.weight.dtype == torch.int8
    assert layers.weight_shape(layer) == (48, 64)
    assert torch.equal(module(x), F.linear(x, weight, b))
    # rows split and join packed, and stand for the rows of the weight
    top, bottom = split_rows(packed, (0, 20)), split_rows(packed, (20, 48))
    assert isinstance(top, Packed) and torch.equal(top.dequantize(), weight[:20])
    joined = cat_rows([bottom, top])  # the codec does not join: dequantized and concatenated
    assert torch.equal(joined, torch.cat([weight[20:], weight[:20]]))


def test_a_format_whose_rows_do_not_split_is_dequantized_first():
    @dataclass(frozen=True)
    class Whole(RowInt8):
        def rows(self, packed, index):
            return None

    packed, weight = row_int8(torch.randn(8, 32, generator=torch.Generator().manual_seed(1)))
    packed = Packed(packed.raw, Whole(), packed.shape, packed.extras)
    got = split_rows(packed, (2, 5))
    assert not isinstance(got, Packed) and torch.equal(got, weight[2:5])
    with pytest.raises(TypeError, match="row-int8 weights do not split by rows"):
        packed.rows(slice(2, 5))


def test_gguf_rows_split_and_join_packed():
    gguf = pytest.importorskip("gguf")
    from letterpress.loaders import gguf_quants

    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    qtype = gguf.GGMLQuantizationType.Q8_0
    raw = torch.from_numpy(gguf.quants.quantize(w.numpy(), qtype).copy())
    packed = gguf_quants.packed(raw, qtype, (6, 64))
    weight = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype).copy())  # gguf's own reader
    assert packed.type_name == "Q8_0" and packed.codec == gguf_quants.GgufCodec(int(qtype))
    top, bottom = split_rows(packed, (0, 2)), split_rows(packed, (2, 6))
    joined = cat_rows([bottom, top])
    assert isinstance(joined, Packed) and joined.shape == (6, 64)
    assert torch.equal(joined.dequantize(), torch.cat([weight[2:], weight[:2]]))
    other = gguf_quants.packed(torch.from_numpy(gguf.quants.quantize(w[:2].numpy(), gguf.GGMLQuantizationType.Q4_0)
                                                .copy()), gguf.GGMLQuantizationType.Q4_0, (2, 64))
    assert not isinstance(cat_rows([bottom, other]), Packed)  # two types in one fused weight: dequantized


def test_comfy_codecs_name_their_format_and_pad_only_where_it_does():
    from letterpress.loaders.comfy_quant import ComfyCodec

    nvfp4, fp8 = ComfyCodec({"format": "nvfp4"}), ComfyCodec({"format": "float8_e4m3fn"})
    assert nvfp4.describe() == "nvfp4" and nvfp4.logical_shape((48, 40)) == (48, 80)
    assert nvfp4.padded((48, 80), (40, 72)) and not nvfp4.padded((48, 80), (40, 60))
    assert not fp8.padded((48, 80), (40, 72)) and fp8.logical_shape((48, 80)) == (48, 80)


def test_a_plain_mapping_is_a_view_with_the_protocols_defaults(host):
    state = {"0.weight": torch.full((4, 4), float("nan")), "0.bias": torch.zeros(4)}
    view = checkpoint.view(state, "/models/vae/some.safetensors")
    assert view.file_of("0.weight") == "/models/vae/some.safetensors" and view.shape("0.bias") == (4,)
    assert checkpoint.view(view) is view and not view.quantized and dict(view.metadata) == {}
    module = build_empty(lambda: torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(LetterpressError, match="tensor 0.weight in some.safetensors holds NaN"):
        fill_module(module, state, what="VAE", source="/models/vae/some.safetensors")
