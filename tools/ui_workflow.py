"""Make the UI-format workflows from their API twins in the real ComfyUI editor (not by hand), laid out to read at
a glance.

    python tools/ui_workflow.py --all [--screenshots DIR]           # every workflows/api/*_api.json
    python tools/ui_workflow.py workflows/api/NAME_api.json [...] [--screenshots DIR] [--comfyui PATH]

Starts a ComfyUI tree (default ../shared/comfyui/0.8.0) on CPU with this pack and a models/ tree of empty stand-ins
for every file the workflows name (so their combo values are listed), opens the editor in Debian's chromium through
playwright and, per workflow: loads the API twin with the frontend's own `loadApiJson` (which gives linked widget
inputs their slots as the editor does), reads the node sizes the editor computed, and lays the graph out (`layout`,
below, plain Python): columns by stage left to right (loaders; text encode / AR tokens / pictures; DiT sample;
decode / text check; save / preview; a node fed by one of its own stage in a sub-column after it), nodes ordered in
a column by the height of their linked neighbours (barycentre sweeps) and placed beside them without overlapping;
a titled group per model or stage where tools/workflow_notes.json names groups (stacked where they share columns,
each as tall as its tallest column and as wide as its title); a Note with the files the workflow needs (from the
same spec) above the graph or in a free corner of it; and the stored view (extra.ds, which the frontend restores on
open) set so that the whole graph shows in a 1600x1000 window. Several arrangements are tried (sources such as
prompts, pictures and empty latents by their stage, in the loaders' column or in one of their own; nodes in the
earliest or the latest sub-column they can take; the later groups wrapped into a second row, left to right like the
first and moved right so that its wires from above run back least) and of those that show at scale CLEAR or more
the one with the fewest wires across node boxes is kept, else of those within 2% of the largest scale. It writes
workflows/NAME.json, then opens that file in a fresh page at 1600x1000 and checks through the canvas's own transform
that every node and group lies inside the window and is not hidden by the editor's bars, and that the scale is at
least READABLE (below it the editor draws nodes as blank boxes); with --screenshots, a picture of each.
Each single-file loader carries properties.models (the file with its URL and folder, from loaders/explain.py's
table), which the editor's missing-models dialog offers for download.
The output depends only on the API twin, the spec and the editor release. Needs ComfyUI's requirements, playwright,
/usr/bin/chromium and the pack importable as `letterpress` (e.g. installed with pip install -e .).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "tools", "workflow_notes.json")
FOLDERS = {"dit_name": "diffusion_models", "text_encoder_name": "text_encoders", "vae_name": "vae",
           "lora_name": "loras", "prompt_enhancer_name": "text_encoders"}
CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# ---------------------------------------------------------------------------------------------------------------
# Layout (pure: API workflow + the sizes the editor computed + spec -> positions, groups, note, view)

TITLE = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar is drawn above its pos
GROUP_TITLE = 34  # LGraphGroup.titleHeight (font 24 x 1.4)
GROUP_CHAR = 14  # about the width of a character of a group's title (24 px font), measured on the editor's screenshots
CLEAR = 0.65  # a layout that shows at least this large is chosen for the fewest wires across boxes, not its size
COL_GAP, ROW_GAP, PAD, GROUP_GAP = 48, 36, 16, 40
NOTE_WIDTH = 620
VIEW = (1600, 1000)
# the part of a 1600x1000 window where the graph is not hidden by the editor's bars (top menu and tabs, left side
# bar, the minimap at the bottom right), measured on ComfyUI 0.8.0's frontend 1.35.9 (--check verifies it)
FREE = (75, 110, 1585, 735)
READABLE = 8 / 14  # LiteGraph.Canvas.MinFontSizeForLOD 8 px / NODE_TEXT_SIZE 14 px
STAGES = ["loaders", "text / AR / images", "DiT sample", "decode / check", "save / preview"]
STAGE_OF = [  # (substring of the class name, stage); first match wins, anything else is stage 1
    ("LoraLoader", 0), ("TorchCompile", 0), ("Loader", 0), ("ApplyTrainedLoRA", 0),
    ("SaveImage", 4), ("PreviewImage", 4), ("PreviewAny", 4),
    ("Sampler", 2),
    ("VAEDecode", 3), ("TextRead", 3), ("TextAccuracy", 3), ("TextBestOf", 3), ("DrawBoxes", 3), ("PriorPreview", 3),
]


def stage(class_type: str) -> int:
    return next((s for key, s in STAGE_OF if key in class_type), 1)


def _links(api: dict) -> list[tuple[str, str]]:
    return [(v[0], nid) for nid, n in api.items() for v in n["inputs"].values()
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] in api]


def columns(api: dict, whole: dict | None = None, late: bool = False, sources: str = "first") -> dict[str, int]:
    """Column of each node: stages left to right; a node fed by one of its own stage in a later sub-column. `late`: a
    node that is fed in the last sub-column of its stage before what it feeds (else as early as it can be). A source
    (a node fed by nothing in `whole`, the full workflow: a prompt, a picture, an empty latent) in the loaders' column
    (sources "first"), in a column of its own after theirs ("apart") or by its stage ("stage")."""
    whole = whole or api
    fed = {dst for _, dst in _links(whole)}
    preds = {nid: [] for nid in api}
    for src, dst in _links(api):
        preds[dst].append(src)
    key: dict[str, tuple[int, int]] = {}

    def visit(nid, seen=()):
        if nid not in key:
            if nid in seen:
                raise ValueError(f"the workflow has a cycle through node {nid}")
            ps = [visit(p, seen + (nid,)) for p in preds[nid]]
            own = stage(api[nid]["class_type"])
            own = own if nid in fed or own == 4 or sources == "stage" else 0
            s = max([own] + [k[0] for k in ps])  # never left of what feeds it
            first = int(sources == "apart" and nid not in fed and stage(api[nid]["class_type"]) != 0)
            key[nid] = (s, max([k[1] + 1 for k in ps if k[0] == s], default=first))
        return key[nid]

    for nid in sorted(api, key=int):
        visit(nid)
    if late:
        last: dict[int, int] = {}
        for st, sub in key.values():
            last[st] = max(last.get(st, 0), sub)
        succs = {nid: [] for nid in api}
        for src, dst in _links(api):
            succs[src].append(dst)
        for nid in sorted(key, key=lambda n: (key[n], int(n)), reverse=True):  # what it feeds first
            if nid in fed:
                same = [key[m][1] for m in succs[nid] if key[m][0] == key[nid][0]]
                key[nid] = (key[nid][0], min(same) - 1 if same else last[key[nid][0]])
    order = sorted(set(key.values()))
    return {nid: order.index(k) for nid, k in key.items()}


def _place(api: dict, sizes: dict[str, list[float]], groups: list[dict], whole: dict, late: bool, sources: str):
    """One row: x and y (top of the drawn box) of each node of `api` and the rectangles of `groups`. A group is as
    tall as its tallest column; in it a node lies level with its linked neighbours where that leaves room."""
    col = columns(api, whole, late, sources)
    ncol = max(col.values()) + 1
    links = _links(api)
    nbrs = {nid: [] for nid in api}
    for src, dst in links:
        nbrs[dst].append(src)
        nbrs[src].append(dst)
    band = {nid: len(groups) for nid in api}  # nodes in no group: placed last, around the groups
    for i, g in enumerate(groups):
        for nid in g["nodes"]:
            band[nid] = i
    width = [max(sizes[n][0] for n in api if col[n] == c) for c in range(ncol)]
    for g in groups:  # a group at least as wide as its title: its last column wider where it is not
        c0, c1 = min(col[n] for n in g["nodes"]), max(col[n] for n in g["nodes"])
        short = GROUP_CHAR * len(g["title"]) - (sum(width[c0:c1 + 1]) + COL_GAP * (c1 - c0) + 2 * PAD)
        width[c1] += max(0.0, short)
    xs = [sum(width[:c]) + COL_GAP * c for c in range(ncol)]
    x = {nid: xs[col[nid]] for nid in api}
    h = {nid: sizes[nid][1] + TITLE for nid in api}  # the box drawn, title bar included
    # groups that share a column are stacked, in the spec's order; others sit side by side
    span = [(min(col[n] for n in g["nodes"]), max(col[n] for n in g["nodes"])) for g in groups]
    y = {nid: 0.0 for nid in api}  # top of the drawn box
    rank = {nid: i for i, nid in enumerate(sorted(api, key=int))}

    def centre(nid):
        return y[nid] + h[nid] / 2

    rects: list[list[float]] = []
    for sweep in range(6):  # barycentre ordering, placement from it, again
        order = {}
        for c in range(ncol):
            members = [n for n in api if col[n] == c]
            if sweep:  # by the mean height of the linked neighbours (left of it first, else right of it)
                def bary(n):
                    left = [centre(m) for m in nbrs[n] if col[m] < c]
                    right = [centre(m) for m in nbrs[n] if col[m] > c]
                    pick = left if sweep % 2 and left else (right or left)
                    return sum(pick) / len(pick) if pick else centre(n)
                members.sort(key=lambda n: (band[n], bary(n), rank[n]))
            else:
                members.sort(key=lambda n: (band[n], rank[n]))
            order[c] = members
        rank = {n: i for c in order for i, n in enumerate(order[c])}
        rects = []
        placed: set[str] = set()
        for b in range(len(groups) + 1):
            members = [n for n in api if band[n] == b]
            if b < len(groups):
                top = max([r[1] + r[3] + GROUP_GAP for r, s in zip(rects, span) if s[0] <= span[b][1] and span[b][0] <= s[1]],
                          default=0.0) + PAD + GROUP_TITLE
                stack = {c: [n for n in order[c] if n in members] for c in range(ncol)}
                bottom = top + max(sum(h[n] + ROW_GAP for n in ns) - ROW_GAP for ns in stack.values() if ns)
            for c in range(ncol):
                if b < len(groups):
                    cursor = top
                    for i, n in enumerate(stack[c]):
                        known = [centre(m) for m in nbrs[n] if m in placed and col[m] < c] or \
                                [centre(m) for m in nbrs[n] if sweep and col[m] > c] or [cursor + h[n] / 2]
                        below = sum(h[m] + ROW_GAP for m in stack[c][i:]) - ROW_GAP  # it and what comes under it
                        y[n] = max(cursor, min(sum(known) / len(known) - h[n] / 2, bottom - below))
                        cursor = y[n] + h[n] + ROW_GAP
                        placed.add(n)
                else:  # free nodes: nearest free place in their column to their neighbours' height, outside groups
                    for n in (n for n in order[c] if n in members):
                        known = [centre(m) for m in nbrs[n] if m in placed] or [0.0]
                        want = sum(known) / len(known) - h[n] / 2
                        busy = [(y[m] - ROW_GAP, y[m] + h[m] + ROW_GAP) for m in placed if col[m] == c] + \
                               [(r[1] - ROW_GAP, r[1] + r[3] + ROW_GAP) for r in rects if r[0] < x[n] + width[c] and x[n] < r[0] + r[2]]
                        y[n] = _nearest_gap(want, h[n], busy)
                        placed.add(n)
            if b < len(groups):
                mem = groups[b]["nodes"]
                x0, x1 = min(x[n] for n in mem), max(x[n] + sizes[n][0] for n in mem)
                y0, y1 = min(y[n] for n in mem), max(y[n] + h[n] for n in mem)
                rects.append([x0 - PAD, y0 - PAD - GROUP_TITLE, x1 - x0 + 2 * PAD, y1 - y0 + 2 * PAD + GROUP_TITLE])
    # the row's top left corner at (0, 0)
    boxes = [(x[n], y[n]) for n in api] + [(r[0], r[1]) for r in rects]
    dx, dy = min(b[0] for b in boxes), min(b[1] for b in boxes)
    return ({n: x[n] - dx for n in api}, {n: y[n] - dy for n in api},
            [[r[0] - dx, r[1] - dy, r[2], r[3]] for r in rects])


def _rows(api: dict, groups: list[dict]) -> list[list[int]]:
    """The ways to lay the groups out: all in one row, or the later ones (from each group on) in a second row."""
    return [[0] * len(groups)] + [[0] * k + [1] * (len(groups) - k) for k in range(1, len(groups))]


def _arrange(api: dict, sizes: dict, groups: list[dict], rows: list[int], late: bool, sources: str):
    """Rows of groups stacked top to bottom; a node in no group goes in the row of the groups it is linked to."""
    row = {n: 0 for n in api}
    for g, r in zip(groups, rows):
        for n in g["nodes"]:
            row[n] = r
    ingroup = {n for g in groups for n in g["nodes"]}
    nbrs = {n: set() for n in api}
    for src, dst in _links(api):
        nbrs[src].add(dst)
        nbrs[dst].add(src)
    for n in sorted(api, key=int):  # the row it has most links to, the first of those
        linked = [row[m] for m in nbrs[n] if m in ingroup]
        if n not in ingroup and linked:
            row[n] = min(set(linked), key=lambda r: (-linked.count(r), r))
    x, y, rects, top = {}, {}, [], 0.0
    links = _links(api)
    for r in sorted(set(row.values())):
        sub = {n: v for n, v in api.items() if row[n] == r}
        rx, ry, rr = _place(sub, sizes, [g for g, gr in zip(groups, rows) if gr == r], api, late, sources)
        if x:  # a later row: moved right, not beyond the rows above, so that its wires from them run back least
            room = max(x[n] + sizes[n][0] for n in x) - max(rx[n] + sizes[n][0] for n in rx)
            back = [(x[s] + sizes[s][0] + COL_GAP - rx[d]) for s, d in links if s in x and d in rx]
            shifts = sorted({0.0, max(room, 0.0)} | {min(max(b, 0.0), max(room, 0.0)) for b in back})
            shift = min(shifts, key=lambda v: (sum(max(0.0, b - v) for b in back), v))
            rx = {n: v + shift for n, v in rx.items()}
            rr = [[q[0] + shift, q[1], q[2], q[3]] for q in rr]
        x.update(rx)
        y.update({n: v + top for n, v in ry.items()})
        rects += [[q[0], q[1] + top, q[2], q[3]] for q in rr]
        top = max([y[n] + sizes[n][1] + TITLE for n in sub] + [q[1] + q[3] for q in rects]) + GROUP_GAP
    return x, y, rects


def layout(api: dict, sizes: dict[str, list[float]], spec: dict) -> dict:
    """Positions for every node, group rectangles, the note's box and the stored view (extra.ds): of the ways to
    arrange the groups in rows, the one the whole of which shows largest in a 1600x1000 window."""
    groups = spec.get("groups", [])
    for g in groups:
        for nid in g["nodes"]:
            if nid not in api:
                raise ValueError(f"group {g['title']!r} names node {nid}, which the API workflow does not have")
    found = []
    for rows in _rows(api, groups):
        for sources in ("stage", "first", "apart"):
            for late in (False, True):
                x, y, rects = _arrange(api, sizes, groups, rows, late, sources)
                lay = _view(api, sizes, spec, x, y, rects)
                found.append((lay, _crossings(api, sizes, x, y)))
    # of those large enough to read with ease (else of those within 2% of the largest), the one with the fewest
    # wires across boxes, then the largest, then the first
    top = max(lay["ds"]["scale"] for lay, _ in found)
    pick = max((-c, lay["ds"]["scale"], -i) for i, (lay, c) in enumerate(found)
               if lay["ds"]["scale"] >= min(CLEAR, 0.98 * top))
    return found[-pick[2]][0]


def _crossings(api: dict, sizes: dict, x: dict, y: dict) -> int:
    """How many node boxes the wires (as straight lines from an output to an input) pass through."""
    box = {n: (x[n], y[n], x[n] + sizes[n][0], y[n] + sizes[n][1] + TITLE) for n in api}
    count = 0
    for dst, node in api.items():
        linked = [v for v in node["inputs"].values() if isinstance(v, list) and len(v) == 2 and v[0] in api]
        for i, (src, out) in enumerate(linked):  # slots about 20 apart under the title bar, in the inputs' order
            count += _through(box, src, dst, (box[src][2], box[src][1] + TITLE + 14 + 20 * out),
                              (box[dst][0], box[dst][1] + TITLE + 14 + 20 * i))
    return count


def _through(box: dict, src: str, dst: str, a: tuple, b: tuple) -> int:
    """How many boxes besides src's and dst's the straight line from a to b passes through."""
    (ax, ay), (bx, by), count = a, b, 0
    for n, (x0, y0, x1, y1) in box.items():
        if n in (src, dst):
            continue
        t0, t1 = 0.0, 1.0  # clip the segment to the box (Liang-Barsky)
        for p, q in ((ax - bx, ax - x0), (bx - ax, x1 - ax), (ay - by, ay - y0), (by - ay, y1 - ay)):
            if p == 0:
                if q < 0:
                    t0, t1 = 1.0, 0.0
            elif p < 0:
                t0 = max(t0, q / p)
            else:
                t1 = min(t1, q / p)
        count += t0 < t1
    return count


def _view(api, sizes, spec, x, y, rects) -> dict:
    groups = spec.get("groups", [])
    h = {nid: sizes[nid][1] + TITLE for nid in api}
    # the note: above the graph, or in a free corner of it, or right of it, wherever the whole shows largest
    boxes = [(x[n], y[n], x[n] + sizes[n][0], y[n] + h[n]) for n in api] + [(r[0], r[1], r[0] + r[2], r[1] + r[3]) for r in rects]
    gx0, gy0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    gx1, gy1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    note_text = spec["note"]
    fx0, fy0, fx1, fy1 = FREE
    best = None
    for note_w in (NOTE_WIDTH, NOTE_WIDTH * 4 / 3):
        chars = int((note_w - 24) / 7.2)  # the note's text box: about 7.2 px a character at its 12 px font
        lines = sum(max(1, -(-len(line) // chars)) for line in note_text.split("\n"))
        note_h = 16 * lines + 28
        tall = note_h + TITLE  # the drawn box, title bar included
        for nx, ny in [(gx0, gy0 - ROW_GAP - tall), (gx1 - note_w, gy0), (gx1 - note_w, gy1 - tall), (gx0, gy1 - tall),
                       (gx1 + COL_GAP, gy0)]:
            box = (nx - COL_GAP, ny - ROW_GAP, nx + note_w + COL_GAP, ny + tall + ROW_GAP)
            if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                continue
            x0, y0, x1, y1 = min(gx0, nx), min(gy0, ny), max(gx1, nx + note_w), max(gy1, ny + tall)
            scale = min(1.0, (fx1 - fx0) / (x1 - x0), (fy1 - fy0) / (y1 - y0))
            if best is None or scale > best[0] + 1e-9:
                best = (scale, [nx, ny, note_w, note_h], (x0, y0, x1, y1))
    # the view: everything (note, groups, title bars) inside the free part of a 1600x1000 window
    scale, note, (gx0, top, gx1, _) = best
    offset = [((fx0 + fx1) / 2) / scale - (gx0 + gx1) / 2, fy0 / scale - top]
    r2 = lambda v: round(v, 2)  # noqa: E731
    return {"pos": {n: [r2(x[n]), r2(y[n] + TITLE)] for n in api},
            "groups": [{"title": g["title"], "bounding": [r2(v) for v in r], "color": g.get("color", GROUP_COLORS[i % len(GROUP_COLORS)])}
                       for i, (g, r) in enumerate(zip(groups, rects))],
            "note": {"text": note_text, "pos": [r2(note[0]), r2(note[1] + TITLE)], "size": [r2(note[2]), r2(note[3])]},
            "ds": {"scale": round(scale, 4), "offset": [r2(offset[0]), r2(offset[1])]}}


GROUP_COLORS = ["#3f789e", "#b58b2a", "#8A8", "#a1309b"]


def _nearest_gap(want: float, height: float, busy: list[tuple[float, float]]) -> float:
    """The top nearest to `want` where [top, top + height] meets none of the busy intervals."""
    candidates = [want] + [b1 for _, b1 in busy] + [b0 - height for b0, _ in busy]
    ok = [t for t in candidates if all(t + height <= b0 or t >= b1 for b0, b1 in busy)]
    return min(ok, key=lambda t: (abs(t - want), t))


# ---------------------------------------------------------------------------------------------------------------
# The editor


def _stand_ins(api: dict, base: str) -> None:
    """Empty files for the weights and pictures the workflow names, so the editor lists them."""
    for node in api.values():
        for name, value in node["inputs"].items():
            if isinstance(value, str) and name in FOLDERS:
                path = os.path.join(base, "models", FOLDERS[name], value)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "wb").close()
            if node["class_type"] == "LoadImage" and name == "image":
                from PIL import Image

                Image.new("RGB", (64, 64)).save(os.path.join(base, "input", value))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _open_editor(browser, url: str):
    page = browser.new_page(viewport={"width": VIEW[0], "height": VIEW[1]})
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && window.LiteGraph && "
                           "Object.keys(window.LiteGraph.registered_node_types).some(t => t.startsWith('Letterpress'))",
                           timeout=120000)
    return page


def _load(page, script: str, data, count: int) -> None:
    """Load a graph; the editor's own start-up may still replace it (default graph), so load until it holds ours."""
    for _ in range(5):
        page.evaluate(script, data)
        try:
            page.wait_for_function("(n) => window.app.graph._nodes.length === n", arg=count, timeout=20000)
            return
        except Exception:
            pass
    raise RuntimeError(f"the editor did not keep the graph ({count} nodes)")


# seeds kept between queues (loadApiJson sets every control to randomize): a shared width or height, and the text
# models whose output a new DiT seed should re-use from the cache (README: the enhancer's seed is fixed)
FIXED = ["PrimitiveInt", "LetterpressErnieImagePromptEnhance", "LetterpressErnieVLGround", "LetterpressErnieVLGenerate"]

MAKE = """([lay, fixed]) => {
    const graph = window.app.graph;
    for (const n of graph._nodes)
        for (const w of n.widgets || []) if (fixed.includes(n.type) && w.name === "control_after_generate") w.value = "fixed";
    for (const n of graph._nodes) n.pos = lay.pos[String(n.id)];
    for (const n of graph._nodes) if (lay.models[String(n.id)]) n.properties.models = lay.models[String(n.id)];
    const note = window.LiteGraph.createNode("Note");
    graph.add(note);
    note.title = "Files this workflow needs";
    note.widgets[0].value = lay.note.text;
    note.pos = lay.note.pos;
    note.size = lay.note.size;
    for (const g of lay.groups) {
        const group = new window.LiteGraph.LGraphGroup(g.title);
        group.color = g.color;
        graph.add(group);
        group.pos = g.bounding.slice(0, 2);
        group.size = g.bounding.slice(2);
    }
    const ui = graph.serialize();
    ui.extra = {...(ui.extra || {}), ds: lay.ds};
    return JSON.stringify(ui);  // as the editor saves it (no undefined turned into null)
}"""

CHECK = """() => {
    // every node (title bar included) and group, through the canvas's own transform, inside the window and on top
    const c = window.app.canvas, ds = c.ds, el = c.canvas, r = el.getBoundingClientRect();
    const T = window.LiteGraph.NODE_TITLE_HEIGHT, problems = [];
    if (window.devicePixelRatio !== 1) problems.push("devicePixelRatio " + window.devicePixelRatio);
    const page = (x, y) => { const p = ds.convertOffsetToCanvas([x, y]); return [r.left + p[0], r.top + p[1]]; };
    const boxes = window.app.graph._nodes.map(n => [n.title, n.pos[0], n.pos[1] - T, n.pos[0] + n.size[0], n.pos[1] + n.size[1]])
        .concat(window.app.graph._groups.map(g => [g.title, g.pos[0], g.pos[1], g.pos[0] + g.size[0], g.pos[1] + g.size[1]]));
    for (const [title, x0, y0, x1, y1] of boxes) {
        const [a, b] = [page(x0, y0), page(x1, y1)];
        if (a[0] < 0 || a[1] < 0 || b[0] > innerWidth || b[1] > innerHeight) problems.push(title + " outside the window: " + [a, b]);
        for (const [px, py] of [[a[0] + 3, a[1] + 3], [b[0] - 3, a[1] + 3], [a[0] + 3, b[1] - 3], [b[0] - 3, b[1] - 3]]) {
            const hit = document.elementFromPoint(px, py);
            if (hit !== el) problems.push(title + " hidden at " + [Math.round(px), Math.round(py)] + " by " + (hit && (hit.className || hit.tagName)));
        }
    }
    return {problems, ds: {scale: ds.scale, offset: [...ds.offset]}};
}"""


def node_models(api: dict) -> dict[str, list[dict]]:
    """properties.models of each single-file loader of the workflow, by node id: the file it picks, with its URL and
    folder from loaders/explain.py's table (FileLoader.models), as ComfyUI's templates carry them."""
    from letterpress.nodes import NODE_CLASS_MAPPINGS
    from letterpress.nodes.common import FileLoader

    found = {}
    for nid, node in api.items():
        cls = NODE_CLASS_MAPPINGS.get(node["class_type"])
        if isinstance(cls, type) and issubclass(cls, FileLoader) and cls.models(node["inputs"]):
            found[nid] = cls.models(node["inputs"])
    return found


def make(page, api: dict, name: str, spec: dict) -> dict:
    _load(page, "([api, name]) => window.app.loadApiJson(api, name)", [api, name], len(api))
    sizes = page.evaluate("() => Object.fromEntries(window.app.graph._nodes.map(n => [String(n.id), [...n.size]]))")
    lay = {**layout(api, sizes, spec), "models": node_models(api)}
    ui = json.loads(page.evaluate(MAKE, [lay, FIXED]))
    ui["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-letterpress/workflows/" + name))  # not a random one
    for node in ui["nodes"]:
        if node["type"] == "PreviewAny":  # the editor's own display widgets hold nothing to keep
            node["widgets_values"] = []
    return ui


def check(browser, url: str, ui: dict, name: str, screenshot: str | None) -> list[str]:
    """Open the saved file in a fresh editor at 1600x1000, as a user would, and list what is not in view."""
    page = _open_editor(browser, url)
    try:
        _load(page, "([ui, name]) => window.app.loadGraphData(ui, true, true, name)", [ui, name + ".json"], len(ui["nodes"]))
        # the template browser a new user sees first covers the graph: close it
        page.evaluate("() => document.querySelectorAll('.p-dialog-mask').forEach(e => e.remove())")
        page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        seen = page.evaluate(CHECK)
        problems = seen["problems"]
        if abs(seen["ds"]["scale"] - ui["extra"]["ds"]["scale"]) > 1e-6:
            problems.append(f"the editor opened it at scale {seen['ds']['scale']}, not the stored {ui['extra']['ds']}")
        if seen["ds"]["scale"] < READABLE:
            problems.append(f"the whole graph shows only at scale {seen['ds']['scale']:.4f}, below which the editor "
                            f"draws nodes as blank boxes without their titles and widgets ({READABLE:.4f})")
        if screenshot:
            page.screenshot(path=screenshot)
        return problems
    finally:
        page.close()


@contextlib.contextmanager
def editor(comfyui: str, apis: list[dict], front_end_root: str | None = None):
    """(browser, url): the ComfyUI tree `comfyui` on CPU with this pack and stand-ins for the files `apis` name,
    its editor (`front_end_root`, else the installed frontend) reached through Debian's chromium."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as base:
        os.makedirs(os.path.join(base, "custom_nodes"))
        os.makedirs(os.path.join(base, "input"))
        os.symlink(ROOT, os.path.join(base, "custom_nodes", "ComfyUI-Letterpress"))
        for api in apis:
            _stand_ins(api, base)
        port = _port()
        log = open(os.path.join(tempfile.gettempdir(), "letterpress_ui_workflow.log"), "w")
        server = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                   "--base-directory", base, "--disable-auto-launch",
                                   *(["--front-end-root", front_end_root] if front_end_root else [])],
                                  cwd=comfyui, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(480):
                try:
                    urllib.request.urlopen(url + "/system_stats", timeout=5)
                    break
                except OSError:
                    time.sleep(0.5)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM)
                yield browser, url
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("api", nargs="*", help="API workflows (workflows/api/NAME_api.json)")
    ap.add_argument("--all", action="store_true", help="every workflows/api/*_api.json")
    ap.add_argument("--comfyui", default=next((p for p in [os.path.join(ROOT, "..", "shared", "comfyui", "0.8.0"),
                                                           "/work/shared/comfyui/0.8.0"] if os.path.isdir(p)), None))
    ap.add_argument("--screenshots", metavar="DIR", help="write DIR/NAME.png of each file as it opens")
    args = ap.parse_args()
    paths = sorted(glob.glob(os.path.join(ROOT, "workflows", "api", "*_api.json"))) if args.all else args.api
    if not paths:
        ap.error("name API workflows or give --all")
    specs = json.load(open(SPEC))
    jobs = []
    for path in paths:
        name = os.path.basename(path).removesuffix("_api.json")
        if name not in specs:
            sys.exit(f"{SPEC} has no entry for {name}: add its note (the files it needs and where they go) and, "
                     "if it has more than one model, its groups")
        jobs.append((name, json.load(open(path)), specs[name]))
        layout(jobs[-1][1], {n: [300, 100] for n in jobs[-1][1]}, jobs[-1][2])  # a bad spec fails before the editor starts
    if args.screenshots:
        os.makedirs(args.screenshots, exist_ok=True)

    failed = []
    with editor(args.comfyui, [api for _, api, _ in jobs]) as (browser, url):
        for name, api, spec in jobs:
            page = _open_editor(browser, url)
            ui = make(page, api, name, spec)
            page.close()
            out = os.path.join(ROOT, "workflows", name + ".json")
            with open(out, "w") as f:
                json.dump(ui, f, indent=2)
                f.write("\n")
            shot = os.path.join(args.screenshots, name + ".png") if args.screenshots else None
            problems = check(browser, url, ui, name, shot)
            print(out, f"ok (scale {ui['extra']['ds']['scale']})" if not problems else
                  "NOT IN VIEW OR NOT READABLE:\n  " + "\n  ".join(problems), flush=True)
            failed += [name] if problems else []
    if failed:
        sys.exit(f"not fully in view or not readable at {VIEW[0]}x{VIEW[1]}: {', '.join(failed)}")


if __name__ == "__main__":
    main()
