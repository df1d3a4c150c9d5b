"""Node classes: one module per registered model family (nodes/<key>.py, loaders/families.py REGISTERED), then the
tools that serve every family. Each module exports NODES and DISPLAY_NAMES."""

import importlib

from ..loaders import families
from . import text_check, training

FAMILIES = [importlib.import_module(f".{key}", __package__) for key in families.REGISTERED]
TOOLS = [text_check, training]  # Read Text, Text Accuracy, Best of Batch; LoRA training: dataset, Save LoRA

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in FAMILIES + TOOLS:
    NODE_CLASS_MAPPINGS.update(_module.NODES)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.DISPLAY_NAMES)
