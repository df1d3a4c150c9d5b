"""A custom node file for ComfyUI that benchmarks/gpu_check_comfyui.py puts in its base directory's custom_nodes: it
samples the device's used memory, and its node `LetterpressGpuProbe` reports and resets that together with torch's
peak allocation and the peak resident memory of ComfyUI's process. It reads torch alone, never ComfyUI: the check
times the steps from ComfyUI's websocket progress events and reads from ComfyUI's log whether dynamic VRAM was on."""

import json
import resource
import threading
import time

import torch

DEVICE_PEAK = [0]  # the most device memory in use (all processes, as cudaMemGetInfo tells), sampled every 20 ms


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
            "peak_allocated": torch.cuda.max_memory_allocated() if cuda else None,
            "peak_device_used": DEVICE_PEAK[0] if cuda else None,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # this process, since its start
            "device": torch.cuda.get_device_name() if cuda else "cpu",
        }
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            DEVICE_PEAK[0] = 0
        return {"ui": {"text": [json.dumps(report)]}}


NODE_CLASS_MAPPINGS = {"LetterpressGpuProbe": LetterpressGpuProbe}
