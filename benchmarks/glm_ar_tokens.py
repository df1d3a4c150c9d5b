"""GLM-Image AR Tokens: generated tokens per second through the pack's node against transformers'
`generate()` on the same model and inputs (interleaved runs, medians), and the cost per token along
the sequence (KV cache: it must not grow beyond what attention over the cache needs).

    python benchmarks/glm_ar_tokens.py [--runs 5] [--size 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()

    from fixtures import glm_image as fx
    from letterpress.loaders.host import StandaloneHost, set_host
    from letterpress.nodes import NODE_CLASS_MAPPINGS as N

    models = tempfile.mkdtemp()
    fx.build(models)
    host = StandaloneHost()
    host.models_dir, host.show_progress = models, False
    set_host(host)
    ar = N["LetterpressGlmImageARLoader"]().run(*_loader_args(N))[0]
    node = N["LetterpressGlmImageARTokens"]()
    prompt = "a red sign with the words open late"
    size = args.size

    processor, model = ar.tokenizer, ar.module
    inputs = processor.apply_chat_template([[{"role": "user", "content": [{"type": "text", "text": prompt}]}]],
                                           tokenize=True, processor_kwargs={"target_h": size, "target_w": size},
                                           return_dict=True, return_tensors="pt")
    grids = inputs["image_grid_thw"]
    max_new = int(grids[:2, 1:].prod(-1).sum()) + 1

    def ours(seed):
        return node.run(ar, prompt, size, size, seed, 0.9, 0.75)[0].generated.numel()

    def reference(seed):
        torch.manual_seed(seed)
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=True, temperature=0.9, top_p=0.75)
        return out.shape[-1] - inputs["input_ids"].shape[-1]

    ours(0), reference(0)  # warm-up
    rates = {"pack": [], "generate": []}
    for i in range(args.runs):
        for name, fn in (("pack", ours), ("generate", reference)):
            start = time.perf_counter()
            n = fn(i + 1)
            rates[name].append(n / (time.perf_counter() - start))

    stamps = []
    host.progress_listeners.append(lambda done, total: stamps.append(time.perf_counter()))
    ours(123)
    host.progress_listeners.clear()
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    q = len(steps) // 4
    early, late = statistics.median(steps[:q]), statistics.median(steps[-q:])

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"GLM-Image AR tokens at {size}x{size} ({max_new} tokens incl. preview grid), tiny AR model, "
          f"{args.runs} interleaved runs, medians")
    print(f"  pack AR Tokens node   {med['pack']:8.1f} tokens/s")
    print(f"  transformers generate {med['generate']:8.1f} tokens/s")
    print(f"  ratio pack / generate {med['pack'] / med['generate']:.3f}  (goal >= 1.0)")
    print(f"  cost per token: first quarter {early * 1e3:.2f} ms, last quarter {late * 1e3:.2f} ms "
          f"(ratio {late / early:.2f}; the prefix is not re-run: without a KV cache it would grow ~linearly "
          f"with the {len(steps)} tokens)")


def _loader_args(N):
    spec = N["LetterpressGlmImageARLoader"].INPUT_TYPES()["required"]
    return [v[0][0] if isinstance(v[0], list) else "auto" for v in spec.values()]


if __name__ == "__main__":
    main()
