"""ERNIE-4.5-VL's routed experts in CPU memory (loaders/ernie_vl_experts.py): they compute what transformers' expert bank
computes, whichever way each expert runs; they leave the model's parameters (so no memory manager moves them); the
model answers token for token as with the experts inside it, headless (here) and inside ComfyUI (test_comfyui)."""

from __future__ import annotations

import pytest
import torch

from letterpress.loaders import ernie_vl_experts
from letterpress.loaders.errors import LetterpressError
from letterpress.loaders.ernie_vl_experts import OffloadedExperts
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

PT = "ERNIE-4.5-VL-28B-A3B-PT"


def _bank(hidden=64, intermediate=48, experts=8, seed=0):
    from transformers import Ernie4_5_VLMoeConfig
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeMoeExperts

    cfg = Ernie4_5_VLMoeConfig(text_config=dict(hidden_size=hidden, moe_num_experts=experts)).text_config
    cfg._experts_implementation = "eager"  # the loop this module keeps
    torch.manual_seed(seed)
    bank = Ernie4_5_VLMoeMoeExperts(cfg, intermediate)
    with torch.no_grad():
        bank.gate_up_proj.normal_(0, 0.1)
        bank.down_proj.normal_(0, 0.1)
    return bank


def _routing(tokens, experts, k=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=g)
    scores[: tokens // 2, 0] += 10  # half the tokens share expert 0: a crowded expert beside lonely ones
    weights, index = torch.topk(scores.softmax(-1), k, dim=-1)
    return index, weights / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("gpu_min_tokens", [0, 5, 10**9], ids=["weights move", "mixed", "tokens move"])
def test_offloaded_experts_compute_what_the_bank_computes(monkeypatch, gpu_min_tokens):
    bank = _bank()
    hidden = torch.randn(20, 64, generator=torch.Generator().manual_seed(2))
    index, weights = _routing(20, 8)
    want = bank(hidden, index, weights)
    offloaded = OffloadedExperts(bank, gpu_min_tokens)
    monkeypatch.setattr(OffloadedExperts, "separate", staticmethod(lambda device: True))  # count as for a GPU
    got = offloaded(hidden, index, weights)
    assert torch.equal(got, want)
    t = offloaded.traffic
    calls = len(index.unique())
    assert t.tokens == index.numel() and t.experts_on_cpu + t.experts_on_device == calls
    per_expert = (2 * 48 * 64 + 64 * 48) * 4
    assert t.weight_bytes == t.experts_on_device * per_expert
    if gpu_min_tokens == 0:
        assert t.token_bytes == 0 and t.experts_on_device == calls
    elif gpu_min_tokens == 5:  # the crowded expert's weights move, the lonely experts' tokens do
        assert 0 < t.experts_on_device < calls and t.token_bytes > 0
    else:  # every routed token row goes to the CPU and back: two rows of 64 floats each
        assert t.weight_bytes == 0 and t.token_bytes == 2 * index.numel() * 64 * 4


def test_the_experts_leave_the_parameters_the_memory_manager_moves():
    bank = _bank()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), bank)
    before = sum(p.numel() for p in model.parameters())
    size = ernie_vl_experts.bank_bytes(model)
    [offloaded] = ernie_vl_experts.offload_experts(model)
    assert model[1] is offloaded and ernie_vl_experts.bank_bytes(model) == size > 0
    assert sum(p.numel() for p in model.parameters()) * 4 == before * 4 - size
    assert "1.gate_up_proj" not in model.state_dict()
    model.to(torch.float64)  # what a memory manager does to the module passes the experts by
    assert offloaded.weights[0].dtype == torch.float32


def test_auto_keeps_them_with_the_model_off_a_gpu_and_a_wrong_choice_is_named():
    model = torch.nn.Sequential(_bank())
    assert not ernie_vl_experts.wanted("auto", model, torch.device("cpu"))
    assert ernie_vl_experts.wanted("in CPU memory", model, torch.device("cpu"))
    with pytest.raises(LetterpressError, match="experts must be one of auto, with the model, in CPU memory"):
        ernie_vl_experts.wanted("cpu", model, torch.device("cpu"))


def test_the_model_answers_token_for_token_with_its_experts_in_cpu_memory(ernie_vl, monkeypatch):
    import numpy as np

    images = torch.from_numpy(np.random.default_rng(3).random((1, 64, 80, 3), dtype=np.float32))
    loader, generate = N["LetterpressErnieVLLoader"](), N["LetterpressErnieVLGenerate"]()

    def ask(model):
        return generate.run(model, images, "free question", "describe this image", "", False, 12, 0.0, 0.8, 0)

    plain = loader.run(PT, "auto", "with the model")[0]
    offloaded = loader.run(PT, "auto", "in CPU memory")[0]
    assert ernie_vl_experts.bank_bytes(offloaded.module) > 0
    assert not any(type(m).__name__ == ernie_vl_experts.EXPERTS for m in offloaded.module.modules())
    monkeypatch.setattr(OffloadedExperts, "separate", staticmethod(lambda device: True))
    assert ask(offloaded) == ask(plain)
    traffic = ernie_vl_experts.traffic(offloaded.module)
    assert traffic.tokens > 0 and traffic.token_bytes + traffic.weight_bytes > 0


@pytest.mark.parametrize("offload", [True, False], ids=["in CPU memory", "in the model"])
@pytest.mark.parametrize("qtype_name", ["Q8_0", "Q4_0"])
def test_a_packed_bank_computes_what_the_bank_computes_with_its_dequantized_weights(monkeypatch, offload, qtype_name):
    """Packed to a ggml type at load (ERNIE-4.5-VL at weight_dtype Q8_0 ...): each expert dequantized where it runs
    equals the eager bank holding gguf's own dequantization of the same bytes; in the model the packed bytes are its
    parameters (what a memory manager places), in CPU memory none are."""
    import gguf

    from letterpress.loaders import quantize

    qtype = quantize.TYPES[qtype_name]
    bank = _bank(hidden=64, intermediate=64)
    packed = OffloadedExperts(bank, 5, offload, qtype)
    with torch.no_grad():
        for w in (bank.gate_up_proj, bank.down_proj):
            raw = gguf.quants.quantize(w.float().numpy(), gguf.GGMLQuantizationType(qtype))
            w.copy_(torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype))))
    hidden = torch.randn(20, 64, generator=torch.Generator().manual_seed(2))
    index, weights = _routing(20, 8)
    monkeypatch.setattr(OffloadedExperts, "separate", staticmethod(lambda device: True))
    assert torch.equal(packed(hidden, index, weights), bank(hidden, index, weights))
    stored = sum(p.numel() for p in packed.parameters())
    assert packed.weight_bytes() == 8 * (quantize.packed_size((128, 64), qtype) + quantize.packed_size((64, 64), qtype))
    assert stored == (0 if offload else packed.weight_bytes())  # uint8 parameters: bytes = elements
