"""Image-size rules shared by every family: a clear error naming the two nearest valid sizes."""

from __future__ import annotations

from ..loaders.errors import LetterpressError

MAX_SIZE = 8192  # the largest width or height a node takes


def check_multiple(width: int, height: int, step: int, model: str, why: str = "") -> None:
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0 or v % step:
            lower, upper = max(step, int(v) // step * step), (int(v) // step + 1) * step
            use = f"{lower}" if lower >= upper else f"{lower} or {upper}"
            raise LetterpressError(f"{model} needs {name} to be a positive multiple of {step}{why}, got {v}. Use {use}.")
        if v > MAX_SIZE:  # a size wired from elsewhere (a Primitive) skips the widget's range
            raise LetterpressError(f"{model}: {name} {v} is above the largest size the nodes take, {MAX_SIZE}.")
