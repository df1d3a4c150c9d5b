"""ERNIE-4.5-VL video: a clip of frames with its frame rate, the frames the model sees, and the prompt inputs.

A clip comes from an IMAGE batch of frames with the frame rate they were taken at, or from ComfyUI's VIDEO (read by
its `get_components()`: images and frame_rate; every supported ComfyUI release has it, and no ComfyUI import is
needed to read it).

What the model sees follows the original release (Baidu's ERNIE-4.5-VL processor): frames taken at 2 per second,
at least 16 and at most 180 (never more than the clip has), each with its time ("time: 00:00:01.50") drawn in its
top-left corner. transformers' `Ernie4_5_VLMoeVideoProcessor` does all of it when given the clip's frame rate and
`fps` 2 (by itself it takes every frame up to max_frames, as it keeps no sampling rate in its settings); the pack
calls it so, with the folder's own min/max frames and font. `sample_fps` 0 keeps transformers' own rule.

The remote path sends the frames the same rule picks (transformers' `sample_frames`, with the original's 16..180)
as vLLM's frame-list video: a `video_url` data URL `data:video/jpeg;base64,<frame>,<frame>,...` (vLLM's
VideoMediaIO reads it as those frames, without resampling). That form carries no frame times: the server draws
none (or draws its own guess), which is the one difference from the local path.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..loaders.ernie_vl import video_processor, video_processor_class
from ..loaders.errors import LetterpressError
from ..loaders.handle import ModelHandle

ORIGINAL_FPS = 2.0  # the original processor's sampling rate; its 16..180 frames are the video processor's defaults
JPEG_QUALITY = 95


@dataclass
class Clip:
    """Frames (T, H, W, C floats 0..1, as ComfyUI's IMAGE) taken at `fps` per second; `sample_fps` the rate the
    model's frames are picked at (0: transformers' rule, every frame up to max_frames)."""

    frames: torch.Tensor
    fps: float
    sample_fps: float = ORIGINAL_FPS

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def clip_from(frames, frame_rate: float, video, sample_fps: float) -> Clip:
    """The clip of the ERNIE-VL Video node: an IMAGE batch with its frame rate, or a ComfyUI VIDEO."""
    if (frames is None) == (video is None):
        raise LetterpressError("ERNIE-VL Video takes one clip: wire either frames (an IMAGE batch, with its "
                               "frame_rate) or a video (a ComfyUI VIDEO, e.g. from Load Video), not both or neither.")
    if not (math.isfinite(sample_fps) and sample_fps >= 0):
        raise LetterpressError(f"sample_fps must be 0 (every frame up to the model's maximum) or positive, got {sample_fps}.")
    if video is not None:
        components = getattr(video, "get_components", None)
        if not callable(components):
            raise LetterpressError(f"The video input is a {type(video).__name__}, not a ComfyUI VIDEO (from Load Video "
                                   "or Create Video); for a batch of frames use the frames input.")
        parts = components()
        frames, frame_rate = parts.images, float(parts.frame_rate)
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[-1] not in (1, 3, 4):
        raise LetterpressError("The frames must be a ComfyUI IMAGE batch (frames, height, width, channels).")
    if frames.shape[0] == 0:
        raise LetterpressError("The video has no frames.")
    if not (math.isfinite(frame_rate) and frame_rate > 0):
        raise LetterpressError(f"The frame rate must be a positive number of frames per second, got {frame_rate}.")
    return Clip(frames, float(frame_rate), float(sample_fps))


def as_uint8(clip: Clip) -> np.ndarray:
    """(T, H, W, 3) uint8 frames, rounded as the images are (samplers/ernie_vl.to_pil), so 8-bit inputs survive."""
    arr = (clip.frames.detach().cpu().float().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def metadata(clip: Clip):
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(total_num_frames=len(clip), fps=clip.fps)


def video_kwargs(clip: Clip) -> dict:
    """The processor arguments that make transformers' video processor pick the original's frames."""
    return {"fps": clip.sample_fps} if clip.sample_fps > 0 else {}


def check_size(clip: Clip, max_aspect: int) -> None:
    h, w = int(clip.frames.shape[1]), int(clip.frames.shape[2])
    if max(w, h) > max_aspect * min(w, h):
        raise LetterpressError(f"The video is {w}x{h} pixels, too narrow for ERNIE-VL (aspect ratios up to "
                               f"{max_aspect}:1). Crop or pad its frames.")


def prepare_inputs(handle: ModelHandle, images: list, clip: Clip, rendered: str) -> dict:
    """Model inputs for the rendered prompt (one video placeholder, after the pictures): transformers' processor
    with its video processor, the clip's frame rate and the sampling rate."""
    processor = video_processor(handle)
    inputs = processor(text=[rendered], images=images or None, videos=[as_uint8(clip)], video_metadata=[metadata(clip)],
                       return_tensors="pt", **video_kwargs(clip))
    inputs = {k: v.to(handle.device) for k, v in inputs.items()}
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(handle.dtype)
    return inputs


def sampled_indices(clip: Clip) -> list[int]:
    """The frames the original's rule picks (transformers' `sample_frames` with its default 16..180 frames)."""
    sampler = video_processor_class()(draw_on_frames=False)
    return [int(i) for i in sampler.sample_frames(metadata(clip), **video_kwargs(clip))]


def frames_url(clip: Clip) -> str:
    """vLLM's frame-list video: the sampled frames as JPEG, base64, joined by commas."""
    from PIL import Image

    arr = as_uint8(clip)
    parts = []
    for k in sampled_indices(clip):
        buf = io.BytesIO()
        Image.fromarray(arr[k]).save(buf, format="JPEG", quality=JPEG_QUALITY)
        parts.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return "data:video/jpeg;base64," + ",".join(parts)


def video_part(clip: Clip) -> dict:
    return {"type": "video_url", "video_url": {"url": frames_url(clip)}}
