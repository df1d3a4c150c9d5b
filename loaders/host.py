"""The one seam between the pack and whatever runs it: `get_host()`.

Inside ComfyUI (its `comfy` package and `folder_paths` importable) the host is ComfyHost (comfy_host.py, the only
module that imports ComfyUI, with comfy_compat.py for release differences); anywhere else StandaloneHost
(standalone_host.py). Both offer the same surface: layer_ops (which layer classes a stage is built from), model_class
(the class a transformers model is built as), wrap,
add_patches, load, free, progress, check_interrupt, previews_enabled, model_folders.
"""

from __future__ import annotations

from .standalone_host import StandaloneHost

try:
    import comfy.model_management  # noqa: F401
    import folder_paths  # noqa: F401

    IN_COMFYUI = True
except ImportError:
    IN_COMFYUI = False

if IN_COMFYUI:  # pragma: no cover - exercised only inside a real ComfyUI
    from . import comfy_compat

    comfy_compat.check_release()
    from .comfy_host import register_trained_loras

    register_trained_loras()

_HOST: StandaloneHost | None = None


def get_host() -> StandaloneHost:
    global _HOST
    if _HOST is None:
        if IN_COMFYUI:
            from .comfy_host import ComfyHost

            _HOST = ComfyHost()
        else:
            _HOST = StandaloneHost()
    return _HOST


def set_host(host: StandaloneHost) -> None:
    """Replace the host (the runner and tests use this to point at their own folders)."""
    global _HOST
    _HOST = host
