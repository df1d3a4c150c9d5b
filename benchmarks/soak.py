"""Soak: many runs in one process through the headless runner, ERNIE-Image-Turbo and Ovis-Image alternating
(the tiny test models), printing resident memory after warm-up, its trend, the models the host holds and the
DiT modules alive. The normal test suite runs 30 of these (tests/test_faults.py); this is the long version.

    python benchmarks/soak.py [--runs 200] [--size 64] [--steps 2] [--budget 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--budget", default="0", help="the host's device budget, e.g. 0 or 2GB")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from fixtures import ernie_image, ovis_image
    from letterpress.loaders.host import StandaloneHost, set_host
    from letterpress.loaders.standalone_host import _parse_bytes

    import test_faults

    models = tempfile.mkdtemp()
    ernie_image.build(models)
    ovis_image.build(models)
    host = StandaloneHost()
    host.models_dir, host.output_dir, host.show_progress = models, tempfile.mkdtemp(), False
    host.device_budget = _parse_bytes(args.budget)
    set_host(host)

    start = time.perf_counter()
    r = test_faults.soak(args.runs, args.warmup, sets=[f"width={args.size}", f"height={args.size}",
                                                       f"steps={args.steps}"])
    took = time.perf_counter() - start
    after = r["rss"][args.warmup:]
    n = len(after)
    xs = range(n)
    mx, my = (n - 1) / 2, sum(after) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, after)) / sum((x - mx) ** 2 for x in xs)
    mib = 2**20
    print(f"runs {args.runs} (warm-up {args.warmup}), {args.size}x{args.size}, {args.steps} steps, "
          f"device {host.compute_device()}, budget {host.device_budget} bytes, {took / args.runs:.2f} s/run")
    print(f"RSS after warm-up            {r['base'] / mib:8.1f} MiB")
    print(f"RSS peak after warm-up       {r['peak_after'] / mib:8.1f} MiB  ({100 * r['growth']:+.2f}%, goal <= +5%)")
    print(f"RSS at the end               {r['last'] / mib:8.1f} MiB  ({100 * (r['last'] / r['base'] - 1):+.2f}%)")
    print(f"RSS trend after warm-up      {slope / 1024:+8.1f} KiB/run")
    print(f"models held by the host, max {r['max_held']} ({r['max_held_bytes'] / mib:.1f} MiB of weights)")
    print(f"DiT modules alive            {r['dits'][0]} after warm-up, {r['dits'][1]} at the end")


if __name__ == "__main__":
    main()
