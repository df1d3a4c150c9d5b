"""GPU check inside ComfyUI 0.33.0: the shipped API workflows through POST /prompt on real-size models with random
weights, under ComfyUI's dynamic VRAM manager (its default on NVIDIA), with it off, and with streaming forced; each
image against diffusers' pipeline on the same weights.

    python benchmarks/gpu_check_comfyui.py --comfyui .gpu/comfyui --budget-s 480    # one NVIDIA GPU
    python benchmarks/gpu_check_comfyui.py --tiny                                   # the tests' tiny models, on CPU

Per family, as far as --budget-s allows (ERNIE-Image-Turbo first, then Ovis-Image, then GLM-Image; what does not fit
is listed as skipped): the pipeline is built with the real architectures and random bf16 weights
(benchmarks/gpu_check.py's builders) under WORK/models/diffusers/<HF repo name>, the DiT also as a Q4_K GGUF under
WORK/models/diffusion_models (ERNIE-Image: the GGUF workflow's DiT loader; random blocks, so that row is not compared);
diffusers' pipeline draws the reference image in this process (enable_model_cpu_offload, bf16) and frees the GPU;
then for each server configuration ComfyUI 0.33.0 starts with WORK as its base directory (models/ there) and a probe
custom node (gpu_check_probe.py), runs the family's workflow (bf16 DiT, then the Q4_K GGUF DiT), and stops:

    dynamic  ComfyUI's default (dynamic VRAM on where comfy-aimdo finds an NVIDIA GPU)
    static   --disable-dynamic-vram (ComfyUI's classic ModelPatcher loads)
    stream   --reserve-vram leaving half the DiT's size free on the GPU, so the DiT cannot stay whole on it

Each row: seconds per DiT step (median step-to-step time of ComfyUI's websocket progress events, as the editor gets them),
peak VRAM (torch.cuda.max_memory_allocated in ComfyUI's process; under dynamic VRAM comfy-aimdo maps weights outside
torch's allocator, so the device's peak use, sampled every 20 ms, is given too), wall time of the prompt, whether
dynamic VRAM was on and how the models were loaded, as ComfyUI's log says ("DynamicVRAM support detected and
enabled"; "prepared for dynamic VRAM loading" from ModelPatcherDynamic, "loaded completely/partially" from the
classic ModelPatcher) and the largest difference
of the saved PNG from the reference image (in 0..1; bf16 in both: small, not 0). Prints a table and a JSON line, and
writes both, with the servers' log tails, to $OUT when it is set.

--tiny runs the same on CPU (--cpu: dynamic VRAM is never on there, and --reserve-vram has nothing to reserve) on the
test suite's tiny models in fp32, where each image must equal the pipeline's within the PNG's rounding;
tests/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import gc
import glob
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests")]
import prompt_api  # noqa: E402  (tests/: the HTTP and websocket client, no ComfyUI import)
import gpu_check  # noqa: E402  (benchmarks/)

FAMILY_ORDER = ("ernie_turbo", "ovis", "glm")
GGUF_RUNS = {"ernie_turbo": "Q4_K"}  # families whose GGUF workflow runs too, and its storage
AT_LOAD_RUNS = {"ernie_turbo": "Q4_0 at load"}  # also run with every stage quantized as it loads (dynamic config)
CONFIGS = ("dynamic", "static", "stream")
PROBE_NODE = "990"
# Seconds on one H100 (estimates, not yet measured): building and saving the family, the reference, and each server
# configuration (start, the family's runs, stop). The budget check skips what these say would not fit.
ESTIMATE_S = {"ernie_turbo": (150, 45, 70), "ovis": (120, 40, 50), "glm": (200, 90, 110)}


def default_comfyui() -> str | None:
    for path in (os.path.join(ROOT, ".gpu", "comfyui"), os.path.join(ROOT, "..", "shared", "comfyui", "0.33.0")):
        if os.path.exists(os.path.join(path, "main.py")):
            return os.path.realpath(path)
    return None


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def allows(self, need: float) -> bool:
        return need <= self.left()


# The server ----------------------------------------------------------------------------------------------------------


def server_args(config: str, tiny: bool, dit_bytes: int) -> list[str]:
    args = ["--cpu"] if tiny else []
    if importlib.util.find_spec("comfyui_frontend_package") is None:  # headless: no editor to serve
        args += ["--front-end-root", tempfile.mkdtemp(prefix="lp_no_frontend_")]
    if config == "static":
        args.append("--disable-dynamic-vram")
    elif config == "stream":
        total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 2 * dit_bytes
        args += ["--reserve-vram", f"{max(total - dit_bytes / 2, 0) / 1024 ** 3:.2f}"]
    return args + ["--disable-api-nodes"]


def base_directory(work: str) -> str:
    """WORK as ComfyUI's base directory: its models/ already there, custom_nodes with the pack and the probe."""
    nodes = os.path.join(work, "custom_nodes")
    os.makedirs(nodes, exist_ok=True)
    if not os.path.exists(os.path.join(nodes, "ComfyUI-Letterpress")):
        os.symlink(ROOT, os.path.join(nodes, "ComfyUI-Letterpress"))
    shutil.copy(os.path.join(HERE, "gpu_check_probe.py"), os.path.join(nodes, "letterpress_gpu_probe.py"))
    return work


def probe(after=None) -> dict:
    """The probe node (a fresh nonce: never cached); after an IMAGE output, it runs once that image is made."""
    inputs = {"nonce": time.monotonic_ns() % 2**31, **({"after": after} if after else {})}
    return {"class_type": "LetterpressGpuProbe", "inputs": inputs}


DYNAMIC_ON = "DynamicVRAM support detected and enabled"  # main.py, once comfy-aimdo initialised the GPU
LOAD_LINES = {"dynamic": "prepared for dynamic VRAM loading", "classic": ("loaded completely", "loaded partially")}


def loads(log: str) -> list[str]:
    """How ComfyUI loaded models, by the lines its patchers log: dynamic (ModelPatcherDynamic) or classic."""
    found = set()
    for kind, lines in LOAD_LINES.items():
        if any(line in log for line in ((lines,) if isinstance(lines, str) else lines)):
            found.add(kind)
    return sorted(found)


def run_prompt(comfy, fam, storage: str, dit_file: str | None, args) -> dict:
    """One workflow through POST /prompt, watched over the websocket, after a probe that clears the peaks."""
    comfy.wait(comfy.queue({PROBE_NODE: probe()}))
    wf = gpu_check.pack_workflow(fam, storage, args.size, args.steps, args.seed, dit_file, args.tiny)
    saved = next(k for k, n in wf.items() if n["class_type"] == "SaveImage" and n["inputs"]["images"][0] == fam.decode_node)
    wf[PROBE_NODE] = probe([fam.decode_node, 0])
    log_start = len(comfy.log())
    start = time.perf_counter()
    events, _ = prompt_api.watch(comfy, wf, timeout=max(args.budget.left(), 60))  # a hang ends with the budget
    wall = time.perf_counter() - start
    pid = next(e["data"]["prompt_id"] for e in events if "prompt_id" in e.get("data", {}))
    entry = comfy.wait(pid)
    if entry["status"]["status_str"] != "success":
        errors = {m[0]: m[1] for m in entry["status"]["messages"]}.get("execution_error", {})
        return {"error": f"{errors.get('exception_type')}: {errors.get('exception_message', '')[:300]}", "wall": wall}
    report = json.loads(entry["outputs"][PROBE_NODE]["text"][0])
    clock = gpu_check.StepClock(args.steps)
    clock.times = [e["received"] for e in events if e["type"] == "progress" and e["data"]["max"] == args.steps]
    log = comfy.log()
    gb = lambda b: b / 1e9 if b is not None else float("nan")  # noqa: E731
    return {"wall": wall, "step": clock.per_step(), "peak": gb(report["peak_allocated"]),
            "device_peak": gb(report["peak_device_used"]), "rss": gb(report["peak_rss"]), "aimdo": DYNAMIC_ON in log,
            "loads": loads(log[log_start:]), "device": report["device"],
            "image": prompt_api.view_image(comfy, entry, saved)}


# One family ----------------------------------------------------------------------------------------------------------


def build(key: str, args, models_dir: str) -> tuple[str | None, int]:
    """The family's folder and GGUF file; returns (the GGUF's name or None, the DiT's bytes)."""
    state = gpu_check.build_folder(key, args.tiny, models_dir)
    if state is None:  # kept from an earlier run
        folder = os.path.join(models_dir, "diffusers", gpu_check.FAMILIES[key].folder, "transformer")
        dit_bytes = sum(os.path.getsize(f) for f in glob.glob(os.path.join(folder, "*.safetensors")))
    else:
        dit_bytes = sum(v.numel() * v.element_size() for v in state.values())
    gguf_file = gpu_check.gguf_dit(key, GGUF_RUNS[key], models_dir, state) if key in GGUF_RUNS else None
    del state
    gc.collect()
    return gguf_file, dit_bytes


def reference(fam, models_dir: str, args) -> dict:
    device = "cpu" if args.tiny else "cuda"
    ref = gpu_check.run_reference(fam, models_dir, args.size, args.steps, args.seed, device)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ref


def image_diff(png: np.ndarray, ref_image: torch.Tensor) -> float:
    """The largest difference, in 0..1, between the saved PNG (SaveImage truncates 255 * x) and the reference."""
    return float(np.abs(png[..., :3] / 255.0 - ref_image[0].numpy()).max())


def prepare(key: str, args, models_dir: str, rows: list[dict]) -> dict | None:
    """The family built and its reference image drawn, or None (a row says why) when the budget has no room for it."""
    fam, budget = gpu_check.FAMILIES[key], args.budget
    build_s, ref_s, config_s = ESTIMATE_S[key] if not args.tiny else (0, 0, 0)
    if not budget.allows(build_s + ref_s + config_s):
        rows.append({"family": fam.label, "config": "-", "run": "-", "skipped": f"did not fit the budget "
                     f"({budget.left():.0f} s left, about {build_s + ref_s + config_s} s needed)"})
        return None
    t = time.monotonic()
    gguf_file, dit_bytes = build(key, args, models_dir)
    print(f"{fam.label}: built in {time.monotonic() - t:.0f} s (DiT {dit_bytes / 1e9:.2f} GB)", flush=True)
    t = time.monotonic()
    ref = reference(fam, models_dir, args)
    rows.append({"family": fam.label, "config": "in process", "run": "diffusers" if args.tiny else "diffusers cpu_offload",
                 "step": ref["step"], "peak": ref["peak"], "wall": ref["wall"], "load_s": time.monotonic() - t - ref["wall"]})
    runs = ([("bf16", None)] + ([(GGUF_RUNS[key], gguf_file)] if gguf_file else [])
            + ([(AT_LOAD_RUNS[key], None)] if key in AT_LOAD_RUNS else []))
    return {"fam": fam, "gguf_file": gguf_file, "dit_bytes": dit_bytes, "ref": ref, "runs": runs, "config_s": config_s}


def check_group(keys: list[str], args, work: str, logs: list[str], rows: list[dict]) -> None:
    """The families built and drawn by the reference, then each server configuration once for all of them; the
    families' files removed at the end unless --keep."""
    models_dir = os.path.join(work, "models")
    ready = [p for p in (prepare(key, args, models_dir, rows) for key in keys) if p]
    if not ready:
        return
    config_s = sum(p["config_s"] for p in ready)
    for config in args.configs:
        if not args.budget.allows(config_s):
            rows.extend({"family": p["fam"].label, "config": config, "run": storage,
                         "skipped": f"did not fit the budget ({args.budget.left():.0f} s left)"}
                        for p in ready for storage, _ in p["runs"])
            continue
        t = time.monotonic()
        dit_bytes = max(p["dit_bytes"] for p in ready)
        comfy = prompt_api.start(args.comfyui, base_directory(work), server_args(config, args.tiny, dit_bytes))
        started = time.monotonic() - t
        try:
            for p in ready:
                for storage, dit_file in p["runs"]:
                    if storage in gpu_check.AT_LOAD and config != "dynamic":  # ComfyUI's default only: the budget
                        continue
                    row = {"family": p["fam"].label, "config": config, "run": storage, "start_s": started}
                    try:
                        out = run_prompt(comfy, p["fam"], storage, dit_file, args)
                    except Exception as e:  # the server died or hung: say so, go on with the next configuration
                        rows.append({**row, "error": repr(e)[:300]})
                        break
                    row.update((k, v) for k, v in out.items() if k != "image")
                    if "image" in out:  # a random Q4_K DiT draws something else: not compared; quantized at load:
                        # the reference's weights with quantization noise
                        row["diff"] = image_diff(out["image"], p["ref"]["image"]) if dit_file is None else "random Q4_K weights"
                    rows.append(row)
                    print(f"  {config} {storage}: {json.dumps(row, default=str)}", flush=True)
                    report(rows, logs, args)
        finally:
            comfy.stop()
            logs.append(f"===== {config}: {comfy.log_path}\n" + "".join(comfy.log().splitlines(True)[-60:]))
        config_s = max(config_s, time.monotonic() - t)  # the next configuration takes about as long
    if not args.keep:  # the disk holds one family at a time
        for p in ready:
            shutil.rmtree(os.path.join(models_dir, "diffusers", p["fam"].folder), ignore_errors=True)
            if p["gguf_file"]:
                os.remove(os.path.join(models_dir, "diffusion_models", p["gguf_file"]))


# Report --------------------------------------------------------------------------------------------------------------


def table(rows: list[dict], header: str) -> str:
    def f(row, key, spec):
        v = row.get(key)
        if v is None:
            return "-"
        if isinstance(v, str):
            return v
        if isinstance(v, bool):
            return "on" if v else "off"
        return "n/a" if v != v else format(v, spec)

    lines = [header, f"{'model':<18} {'server':<10} {'run':<22} {'s/step':>7} {'peak GB':>8} {'device GB':>9} "
                     f"{'RSS GB':>7} {'wall s':>7} {'dyn VRAM':>8}  max |PNG - reference|"]
    for r in rows:
        if "skipped" in r or "error" in r:
            lines.append(f"{r['family']:<18} {r['config']:<10} {r['run']:<22} " + (
                f"skipped: {r['skipped']}" if "skipped" in r else f"FAILED: {r['error']}"))
            continue
        lines.append(f"{r['family']:<18} {r['config']:<10} {r['run']:<22} {f(r, 'step', '.3f'):>7} "
                     f"{f(r, 'peak', '.2f'):>8} {f(r, 'device_peak', '.2f'):>9} "
                     f"{f(r, 'rss', '.1f'):>7} {f(r, 'wall', '.1f'):>7} "
                     f"{f(r, 'aimdo', ''):>8}  {f(r, 'diff', '.4f')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=default_comfyui(), help="a ComfyUI 0.33.0 tree (.gpu/comfyui, else "
                                                                     "../shared/comfyui/0.33.0)")
    parser.add_argument("--families", default=",".join(FAMILY_ORDER))
    parser.add_argument("--configs", default=",".join(CONFIGS), help="dynamic,static,stream")
    parser.add_argument("--size", type=int, default=None, help="image side (1024; --tiny: 32)")
    parser.add_argument("--steps", type=int, default=None, help="DiT steps (8; --tiny: 3)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--budget-s", type=float, default=480, help="what does not fit in this is skipped")
    parser.add_argument("--work", default=None, help="ComfyUI's base directory, models/ inside it")
    parser.add_argument("--keep", action="store_true", help="keep the models (the disk must hold all families'; then "
                                                            "each server configuration starts once for all families)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny models on CPU")
    args = parser.parse_args(argv)
    args.size = args.size or (32 if args.tiny else 1024)
    args.steps = args.steps or (3 if args.tiny else 8)
    args.configs = [c for c in args.configs.split(",") if c]
    if not args.comfyui:
        parser.error("no ComfyUI 0.33.0 tree: name one with --comfyui")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run on an NVIDIA GPU, or use --tiny for the CPU run")
    args.budget = Budget(args.budget_s)
    work = args.work or tempfile.mkdtemp(prefix="lp_gpu_check_comfyui_")
    args.keep = args.keep or args.tiny
    keys = [f for f in args.families.split(",") if f]
    rows, logs = [], []
    for group in [keys] if args.keep else [[key] for key in keys]:  # kept models: one server per configuration
        check_group(group, args, work, logs, rows)
    report(rows, logs, args, final=True)
    return rows


def report(rows: list[dict], logs: list[str], args, final: bool = False) -> None:
    """The table and the JSON line: printed at the end, written to $OUT after every row (a run cut short keeps them)."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "CPU (--tiny, --cpu)"
    header = (f"ComfyUI 0.33.0 ({args.comfyui}), {device}, {args.size}x{args.size}, {args.steps} steps, torch "
              f"{torch.__version__}, {time.monotonic() - args.budget.start:.0f} s{'' if final else ' (so far)'}")
    text = table(rows, header)
    line = json.dumps({"header": header, "rows": rows}, default=str)
    if final:
        print("\n" + text + "\n" + line, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check_comfyui.txt"), "w") as f:
            f.write(text + "\n" + line + "\n")
        with open(os.path.join(os.environ["OUT"], "comfyui_logs.txt"), "w") as f:
            f.write("\n".join(logs))


if __name__ == "__main__":
    main()
