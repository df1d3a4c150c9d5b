"""Image-size rules shared by every family: a clear error naming the two nearest valid sizes."""

from __future__ import annotations

from ..loaders.host import LetterpressError


def check_multiple(width: int, height: int, step: int, model: str, why: str = "") -> None:
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0 or v % step:
            lower, upper = max(step, int(v) // step * step), (int(v) // step + 1) * step
            use = f"{lower}" if lower >= upper else f"{lower} or {upper}"
            raise LetterpressError(f"{model} needs {name} to be a positive multiple of {step}{why}, got {v}. Use {use}.")
