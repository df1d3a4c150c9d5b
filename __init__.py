"""ComfyUI-Letterpress: the open image models that render text best, as staged ComfyUI nodes."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# ComfyUI serves this folder at /extensions/<pack folder>/; its docs/<NodeName>.md is each node's help page
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
