"""A custom node file for ComfyUI that benchmarks/gpu_check_comfyui.py puts in its base directory's custom_nodes: it
records when each progress bar moves (comfy.utils.ProgressBar.update_absolute, which the pack's samplers call once
per step) and samples the device's used memory, and its node `LetterpressGpuProbe` reports and resets them together
with torch's peak allocation and the peak resident memory of this process and whether ComfyUI's dynamic VRAM manager is on."""

import json
import resource
import threading
import time

import torch

import comfy.memory_management
import comfy.model_management as mm
import comfy.utils

TICKS = []  # (perf_counter, value, total) of every progress update since the last probe
DEVICE_PEAK = [0]  # the most device memory in use (all processes, as cudaMemGetInfo tells), sampled every 20 ms
_update_absolute = comfy.utils.ProgressBar.update_absolute


def _recording_update_absolute(self, value, total=None, preview=None):
    TICKS.append((time.perf_counter(), value, total if total is not None else self.total))
    return _update_absolute(self, value, total, preview)


comfy.utils.ProgressBar.update_absolute = _recording_update_absolute


def _sample_device_memory():
    while True:
        free, total = torch.cuda.mem_get_info()
        DEVICE_PEAK[0] = max(DEVICE_PEAK[0], total - free)
        time.sleep(0.02)


if torch.cuda.is_available():
    threading.Thread(target=_sample_device_memory, daemon=True).start()


class LetterpressGpuProbe:
    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"nonce": ("INT", {"default": 0, "min": 0, "max": 2**31})},
                "optional": {"after": ("IMAGE",)}}

    @classmethod
    def IS_CHANGED(cls, nonce, after=None):
        return float("nan")

    def run(self, nonce, after=None):
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
        report = {
            "ticks": list(TICKS),
            "peak_allocated": torch.cuda.max_memory_allocated() if cuda else None,
            "peak_device_used": DEVICE_PEAK[0] if cuda else None,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # this process, since its start
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "aimdo_enabled": bool(getattr(comfy.memory_management, "aimdo_enabled", False)),
            "patchers": sorted({type(m.model).__name__ for m in mm.current_loaded_models if m.model is not None}),
        }
        TICKS.clear()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            DEVICE_PEAK[0] = 0
        return {"ui": {"text": [json.dumps(report)]}}


NODE_CLASS_MAPPINGS = {"LetterpressGpuProbe": LetterpressGpuProbe}
