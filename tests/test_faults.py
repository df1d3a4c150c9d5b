"""Faults and long runs: an interrupted run leaves nothing behind, a failed load leaves no half model,
and many runs in one process hold steady memory and at most the host's budget of models."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from letterpress.runner import Runner, load_workflow, set_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(ROOT, "workflows")
SMALL = ["width=32", "height=32", "steps=1"]


def workflow(name, *sets):
    return set_values(load_workflow(os.path.join(WORKFLOWS, name)), [*SMALL, *sets])


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def live(cls) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is cls)


# The host's budget ------------------------------------------------------------------------------


def test_host_keeps_stages_within_its_budget_and_keeps_none_alive(ernie, host):
    from letterpress.nodes import NODE_CLASS_MAPPINGS as N

    dit, te, vae, _ = N["LetterpressErnieImageFolderLoader"]().run("ERNIE-Image", "auto", False)
    size = lambda h: sum(t.numel() * t.element_size() for t in (*h.module.parameters(), *h.module.buffers()))  # noqa: E731
    assert host.device_budget == 0  # default: only the stages of the current load
    host.load(te)
    host.load(dit)
    assert host.loaded_models() == [dit.describe()] and host.loaded_bytes() == size(dit)
    host.device_budget = size(dit) + size(vae)
    host.load(vae)
    assert host.loaded_models() == [dit.describe(), vae.describe()]
    host.load(te)  # te does not fit beside both: the least recently used (dit) leaves first
    assert host.loaded_models()[-1] == te.describe() and dit.describe() not in host.loaded_models()
    assert host.loaded_bytes() <= host.device_budget
    host.load(dit)
    host.load(vae)
    assert host.loaded_models() == [dit.describe(), vae.describe()]
    assert host.loaded_bytes() <= host.device_budget
    del dit, te, vae
    gc.collect()
    assert host.loaded_models() == []  # the host never keeps a model alive by itself


# Soak -------------------------------------------------------------------------------------------


def soak(runs: int, warmup: int = 4, report=None) -> dict:
    """Alternate ERNIE-Image-Turbo and Ovis-Image workflows through one Runner; RSS after warm-up."""
    from diffusers import ErnieImageTransformer2DModel, OvisImageTransformer2DModel

    from letterpress.loaders.host import get_host

    host = get_host()
    flows = [workflow("ernie_image_turbo_t2i_api.json"), workflow("ovis_image_t2i_api.json", "cfg=1.0")]
    runner = Runner()
    rss, held, dits = [], [], []
    for i in range(runs):
        wf = set_values(flows[i % 2], [f"seed={i}"])
        runner.run(wf)
        rss.append(rss_bytes())
        held.append((len(host.loaded_models()), host.loaded_bytes()))
        if i + 1 == warmup or i + 1 == runs:
            dits.append(live(ErnieImageTransformer2DModel) + live(OvisImageTransformer2DModel))
            rss[-1] = rss_bytes()  # after live()'s collection: the baseline holds no garbage either
        if report:
            report(i, rss[-1], held[-1])
    base = rss[warmup - 1]
    return dict(base=base, peak_after=max(rss[warmup:]), last=rss[-1], growth=max(rss[warmup:]) / base - 1,
                max_held=max(n for n, _ in held), max_held_bytes=max(b for _, b in held),
                budget=host.device_budget, dits=dits)


def test_soak_alternating_families_holds_memory_and_models(ernie, ovis, host):
    """30 runs in one process, ERNIE-Image and Ovis-Image alternating (tiny models, 32px, 1 step): resident
    memory after warm-up stays within 5%, the host holds at most one load's stages (budget 0) and no
    DiT outlives the runs that use it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # toy matmuls gain nothing from a second (shared) core
    try:
        r = soak(30)
    finally:
        torch.set_num_threads(before)
    assert r["growth"] <= 0.05, r
    assert r["max_held"] <= 3 and r["max_held_bytes"] > 0, r  # the largest load asks for 1 stage at a time
    assert r["dits"][1] <= r["dits"][0], r  # no DiT piles up across runs
