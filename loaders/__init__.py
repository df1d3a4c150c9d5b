"""Model finding, detection, conversion and loading; the only code that talks to the host (ComfyUI)."""
