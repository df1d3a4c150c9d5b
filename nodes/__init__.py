"""Node classes, one module per model family. Each module exports NODES and DISPLAY_NAMES."""

from . import ernie_image, glm_image, ovis_image

FAMILIES = [ernie_image, ovis_image, glm_image]
from . import ernie_vl  # noqa: E402  (ERNIE-4.5-VL; kept on its own lines so family edits do not collide)

FAMILIES.append(ernie_vl)
from . import text_check  # noqa: E402  (Read Text, Text Accuracy, Best of Batch)

FAMILIES.append(text_check)
from . import remote_image  # noqa: E402  (ERNIE-Image / GLM-Image on SGLang Diffusion / vLLM-Omni servers)

FAMILIES.append(remote_image)

from . import training  # noqa: E402  (LoRA training: dataset, Save LoRA)

FAMILIES.append(training)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _family in FAMILIES:
    NODE_CLASS_MAPPINGS.update(_family.NODES)
    NODE_DISPLAY_NAME_MAPPINGS.update(_family.DISPLAY_NAMES)
