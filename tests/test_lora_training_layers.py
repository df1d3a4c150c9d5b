"""Which layers a LoRA trains: "all" is every Linear layer of the blocks and nothing outside them (ERNIE-Image's
shared adaLN_modulation, GLM-Image's glyph and prior projectors, Ovis-Image's embedders), a target-module list
trains exactly the layers PEFT's own matching picks, and the counts reported are PEFT's trainable parameters."""

from __future__ import annotations

import pytest
import torch
from letterpress.loaders.errors import LetterpressError
from letterpress.samplers import lora_targets
from letterpress.samplers import lora_training as training

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def in_blocks(model):
    lists = [n for n, c in model.named_children() if isinstance(c, torch.nn.ModuleList)]
    return [n for n in linear_names(model) if any(n.startswith(f"{b}.") for b in lists)]


@pytest.mark.parametrize("family", ["ernie", "ovis", "glm"])
def test_all_is_the_blocks_linear_layers_only(family, ernie, ovis, glm):
    model = {"ernie": ernie, "ovis": ovis, "glm": glm}[family]["transformer"]
    chosen = training.target_layers(model, "all")
    assert chosen == in_blocks(model)
    outside = {"ernie": ["adaLN_modulation.1", "time_embedding.linear_1", "final_linear"],
               "ovis": ["context_embedder", "x_embedder", "proj_out"],
               "glm": ["glyph_projector.net.0.proj", "prior_projector.net.2", "image_projector.proj"]}[family]
    assert set(outside) <= set(linear_names(model)) and not set(outside) & set(chosen)
    assert set(training.target_layers(model, "attention")) | set(training.target_layers(model, "mlp")) <= set(chosen)


def test_target_modules_train_what_peft_picks_and_count_its_parameters(ernie):
    """DiffSynth-Studio's ERNIE-Image recipe list, and one naming a layer outside the blocks: the layers are those
    PEFT's inject_adapter_in_model wraps, the parameter count its trainable parameters."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    for entries in (["to_q", "to_k", "to_v", "to_out.0"], ["linear_fc2", "adaLN_modulation.1"]):
        model = copy.deepcopy(ernie["transformer"])
        chosen = training.target_layers(model, "attention", ", ".join(entries))
        peft_model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=entries), model)
        wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
        assert chosen == wrapped
        trainable = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
        assert lora_targets.lora_parameters(ernie["transformer"], chosen, 4) == trainable
    counts = lora_targets.describe_choices(ernie["transformer"], 4, chosen)
    assert counts["trained"] == {"layers": 3, "parameters": trainable}  # linear_fc2 of the 2 blocks + adaLN
    assert counts["all"]["layers"] == len(in_blocks(ernie["transformer"]))


def test_a_target_that_names_no_layer_is_refused_with_the_names_there_are(ernie):
    with pytest.raises(LetterpressError, match=r"'to_qq' names no Linear layer of this DiT.*self_attention.to_q"):
        training.target_layers(ernie["transformer"], "attention", "to_q,to_qq")
    with pytest.raises(LetterpressError, match="names no Linear layer"):  # a container, not a Linear layer
        training.target_layers(ernie["transformer"], "attention", "self_attention")
