"""Loading a single-file DiT checkpoint of >= 2 GB (random weights, the real ERNIE-Image key layout):
peak RSS / file size and load time / diffusers `from_single_file`, each load in a fresh process,
interleaved, medians. `--gguf Q8_0` (or Q4_K, ...) measures a GGUF file of that type instead (written with the
`gguf` package's quantizer): the weights stay packed, so peak RSS after loading and dequantizing every layer once
(as a forward pass does, one layer at a time) should stay near the file size. `--quantize Q8_0` (or Q4_0, ...)
loads a bf16 safetensors file with that weight_dtype: each Linear weight quantized as it is read, so peak RSS should
stay near the packed model's size plus its largest layer, never the bf16 file's.

    python benchmarks/load_single_file.py [--runs 3] [--layers 10] [--keep DIR]
    python benchmarks/load_single_file.py --gguf Q8_0 --layers 37 [--runs 3] [--keep DIR]
    python benchmarks/load_single_file.py --quantize Q8_0 --layers 19 [--runs 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HIDDEN, HEADS, FFN, TEXT = 2048, 16, 6144, 3072

CHILD = r"""
import json, sys, time
import torch
import letterpress.loaders.ernie_image
from diffusers import ErnieImageTransformer2DModel  # imports are not part of the load

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

kind, path, cfg_dir = sys.argv[1:4]
baseline = rss("VmRSS")
start = time.perf_counter()
if kind in ("pack", "gguf") or kind.startswith("Q"):
    from letterpress.loaders.ernie_image import load_dit
    from letterpress.loaders.host import get_host
    from letterpress.loaders.storage import resolve
    handle = load_dit(path, resolve({"pack": "fp32", "gguf": "bf16"}.get(kind, kind), get_host().compute_device()))
    n = sum(p.numel() for p in handle.module.parameters())
else:
    from diffusers import ErnieImageTransformer2DModel
    model = ErnieImageTransformer2DModel.from_single_file(path, config=cfg_dir, torch_dtype=torch.float32)
    n = sum(p.numel() for p in model.parameters())
elapsed = time.perf_counter() - start
peak_load = rss("VmHWM")
loaded = sum(t.numel() * t.element_size() for t in [*handle.module.parameters(), *handle.module.buffers()]) \
    if kind != "diffusers" else 0
if kind != "pack" and kind != "diffusers":  # every packed layer dequantized once, one at a time, as a forward pass does
    from letterpress.loaders import layers
    touched = 0.0
    for m in handle.module.modules():
        if layers.is_packed(m):
            touched += float(layers.dequantized_weight(m, torch.bfloat16).float().sum())
    n = sum(m.weight.numel() if not layers.is_packed(m) else torch.Size(m.qshape).numel()
            for m in handle.module.modules() if isinstance(getattr(m, "weight", None), torch.Tensor))
else:
    params = handle.module.parameters() if kind == "pack" else model.parameters()
    touched = sum(float(p.float().sum()) for p in params)  # read every weight, as a first forward would
print(json.dumps({"seconds": elapsed, "baseline": baseline, "peak_load": peak_load, "peak_used": rss("VmHWM"),
                  "params": n, "loaded": loaded}))
"""


def make_checkpoint(folder: str, layers: int, dtype=None) -> str:
    import torch
    from diffusers import ErnieImageTransformer2DModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = ErnieImageTransformer2DModel(hidden_size=HIDDEN, num_attention_heads=HEADS, num_layers=layers,
                                             ffn_hidden_size=FFN, text_in_dim=TEXT)
    model.save_config(os.path.join(folder, "transformer"))
    gen = torch.Generator().manual_seed(0)
    tensors = {f"model.diffusion_model.{k}": (0.02 * torch.randn(v.shape, generator=gen)).to(dtype or torch.float32)
               for k, v in model.state_dict().items()}
    path = os.path.join(folder, "ernie-image-bench.safetensors" if dtype is None else "ernie-image-bench-bf16.safetensors")
    save_file(tensors, path)
    return path


def make_gguf(folder: str, layers: int, qtype_name: str) -> str:
    """The same architecture as a GGUF file: 2-D weights in `qtype_name`, the rest F32, written tensor by tensor."""
    import gguf
    import numpy as np
    import torch
    from diffusers import ErnieImageTransformer2DModel

    qtype = gguf.GGMLQuantizationType[qtype_name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    with torch.device("meta"):
        model = ErnieImageTransformer2DModel(hidden_size=HIDDEN, num_attention_heads=HEADS, num_layers=layers,
                                             ffn_hidden_size=FFN, text_in_dim=TEXT)
    path = os.path.join(folder, f"ernie-image-bench-{qtype_name}.gguf")
    writer = gguf.GGUFWriter(path, "ernie_image")
    rng = np.random.default_rng(0)
    for key, value in model.state_dict().items():
        array = (0.02 * rng.standard_normal(tuple(value.shape), dtype=np.float32))
        if array.ndim == 2 and array.shape[1] % block == 0:
            writer.add_tensor("model.diffusion_model." + key, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor("model.diffusion_model." + key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main_gguf(args) -> None:
    folder = args.keep or tempfile.mkdtemp()
    path = os.path.join(folder, f"ernie-image-bench-{args.gguf}.gguf")
    if not os.path.exists(path):
        path = make_gguf(folder, args.layers, args.gguf)
    size = os.path.getsize(path)
    runs = []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-c", CHILD, "gguf", path, folder], capture_output=True, text=True,
                             check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {m: statistics.median(r[m] for r in runs) for m in ("seconds", "baseline", "peak_load", "peak_used")}
    print(f"GGUF {args.gguf} ERNIE-Image DiT, {size / 2**30:.2f} GiB ({runs[0]['params'] / 1e6:.0f} M weights), "
          f"{args.runs} fresh-process loads, medians; RSS after imports is the baseline")
    print(f"  load {med['seconds']:.2f} s | peak RSS after load {med['peak_load'] / 2**30:.2f} GiB | after dequantizing "
          f"every layer once {med['peak_used'] / 2**30:.2f} GiB")
    print(f"  peak RSS / file size (above import baseline, every layer dequantized)  "
          f"{(med['peak_used'] - med['baseline']) / size:.3f}  (goal <= 1.15)")
    print(f"  peak RSS / file size (whole process)                                  {med['peak_used'] / size:.3f}")


def main_quantize(args) -> None:
    import torch
    from safetensors import safe_open

    folder = args.keep or tempfile.mkdtemp()
    path = os.path.join(folder, "ernie-image-bench-bf16.safetensors")
    if not os.path.exists(path):
        path = make_checkpoint(folder, args.layers, torch.bfloat16)
    size = os.path.getsize(path)
    with safe_open(path, "pt") as f:  # the largest layer, as the file holds it (bf16)
        largest = max(2 * torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    runs = []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-c", CHILD, args.quantize, path, folder], capture_output=True,
                             text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {m: statistics.median(r[m] for r in runs) for m in ("seconds", "baseline", "peak_load", "peak_used", "loaded")}
    above = med["peak_used"] - med["baseline"]
    print(f"bf16 ERNIE-Image DiT, {size / 2**30:.2f} GiB ({runs[0]['params'] / 1e6:.0f} M weights) loaded as "
          f"{args.quantize}, {args.runs} fresh-process loads, medians; RSS after imports is the baseline")
    print(f"  load {med['seconds']:.1f} s | loaded model {med['loaded'] / 2**30:.2f} GiB (packed Linear weights, the rest "
          f"in the compute dtype) | largest layer {largest / 2**20:.0f} MiB bf16 | peak RSS after load "
          f"{med['peak_load'] / 2**30:.2f} GiB, after dequantizing every layer once {med['peak_used'] / 2**30:.2f} GiB")
    load_above = med["peak_load"] - med["baseline"]
    print(f"  peak RSS while loading, above baseline / (loaded size + largest layer)   "
          f"{load_above / (med['loaded'] + largest):.3f}  (goal <= 1.15)")
    print(f"  peak RSS above baseline, every layer also dequantized once / (loaded size + largest layer)   "
          f"{above / (med['loaded'] + largest):.3f}")
    print(f"  peak RSS above baseline / loaded size                     {above / med['loaded']:.3f}")
    print(f"  peak RSS above baseline / bf16 file size                  {above / size:.3f}")
    print(f"  peak RSS of the whole process / loaded size               {med['peak_used'] / med['loaded']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--keep", default=None, help="reuse/keep the checkpoint in this folder")
    ap.add_argument("--gguf", default=None, help="measure a GGUF file of this type (Q8_0, Q4_K, ...) instead")
    ap.add_argument("--quantize", default=None, help="load a bf16 file quantized at load to this type (Q8_0, Q4_0, ...)")
    args = ap.parse_args()
    if args.gguf:
        return main_gguf(args)
    if args.quantize:
        return main_quantize(args)
    folder = args.keep or tempfile.mkdtemp()
    path = os.path.join(folder, "ernie-image-bench.safetensors")
    if not os.path.exists(path):
        path = make_checkpoint(folder, args.layers)
    size = os.path.getsize(path)
    results: dict[str, list[dict]] = {"pack": [], "diffusers": []}
    for _ in range(args.runs):
        for kind in results:
            out = subprocess.run([sys.executable, "-c", CHILD, kind, path, os.path.join(folder, "transformer")],
                                 capture_output=True, text=True, check=True)
            results[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    fields = ("seconds", "baseline", "peak_load", "peak_used")
    med = {k: {m: statistics.median(r[m] for r in v) for m in fields} for k, v in results.items()}
    print(f"single-file ERNIE-Image DiT, {size / 2**30:.2f} GiB fp32 ({results['pack'][0]['params'] / 1e6:.0f} M params), "
          f"{args.runs} interleaved fresh-process loads, medians; RSS after imports is the baseline")
    for k, v in med.items():
        print(f"  {k:10s} load {v['seconds']:6.2f} s | baseline {v['baseline'] / 2**30:4.2f} GiB | "
              f"peak RSS after load {v['peak_load'] / 2**30:5.2f} GiB | after reading every weight "
              f"{v['peak_used'] / 2**30:5.2f} GiB = {(v['peak_used'] - v['baseline']) / size:.2f} x file above baseline")
    p = med["pack"]
    print(f"  pack peak RSS / file size (above import baseline, all weights read)  {(p['peak_used'] - p['baseline']) / size:.3f}  (goal <= 1.15)")
    print(f"  pack peak RSS / file size (whole process, all weights read)          {p['peak_used'] / size:.3f}")
    print(f"  pack load time / diffusers from_single_file                          {p['seconds'] / med['diffusers']['seconds']:.3f}  (goal <= 1.00)")


if __name__ == "__main__":
    main()
