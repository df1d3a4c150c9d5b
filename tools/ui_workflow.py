"""Make a UI-format workflow from its API twin in the real ComfyUI editor (not by hand).

    python tools/ui_workflow.py workflows/api/NAME_api.json [--comfyui ../shared/comfyui/0.8.0] [--screenshot FILE]
                                [--note TEXT]

Starts the ComfyUI tree on CPU with this pack and a models/ tree of empty stand-ins for every file the workflow names
(so its combo values are listed), opens the editor in Debian's chromium through playwright, loads the API workflow
with the frontend's own `loadApiJson` (which gives linked widget inputs their slots as the editor does), lays the
graph out left to right in execution order, and writes workflows/NAME.json; with --screenshot, a picture of it.
With --note, a core Note node holding TEXT goes below the graph (the editor's own node: it is never queued, so
the API twin has none; the Remote workflows say there how to start their server).
Needs ComfyUI's requirements, playwright and /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = {"dit_name": "diffusion_models", "text_encoder_name": "text_encoders", "vae_name": "vae",
           "lora_name": "loras", "enhancer_name": "text_encoders"}
CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("api")
    ap.add_argument("--comfyui", default=os.path.join(ROOT, "..", "shared", "comfyui", "0.8.0"))
    ap.add_argument("--screenshot")
    ap.add_argument("--note", help="text of a Note node placed below the graph")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    api = json.load(open(args.api))
    name = os.path.basename(args.api).removesuffix("_api.json")
    with tempfile.TemporaryDirectory() as base:
        os.makedirs(os.path.join(base, "custom_nodes"))
        os.makedirs(os.path.join(base, "input"))
        os.symlink(ROOT, os.path.join(base, "custom_nodes", "ComfyUI-Letterpress"))
        _stand_ins(api, base)
        port = _port()
        log = open(os.path.join(tempfile.gettempdir(), "letterpress_ui_workflow.log"), "w")
        server = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                   "--base-directory", base, "--disable-auto-launch"], cwd=args.comfyui,
                                  stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(240):
                try:
                    urllib.request.urlopen(url + "/system_stats", timeout=5)
                    break
                except OSError:
                    time.sleep(0.5)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM)
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.goto(url, wait_until="domcontentloaded")
                page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph && "
                                       "Object.keys(window.LiteGraph.registered_node_types).some(t => "
                                       "t.startsWith('Letterpress'))", timeout=120000)
                page.wait_for_timeout(3000)  # let the editor finish its own start (default graph, dialogs)
                for _ in range(3):  # the editor's start-up may still replace the graph: load until it holds ours
                    page.evaluate("([api, name]) => window.app.loadApiJson(api, name)", [api, name])
                    try:
                        page.wait_for_function("(n) => window.app.graph._nodes.length === n", arg=len(api),
                                               timeout=20000)
                        break
                    except Exception:
                        print("nodes in the graph:", page.evaluate("() => window.app.graph._nodes.length"))
                ui = page.evaluate("""(note) => {
                    const graph = window.app.graph, ds = window.app.canvas.ds;
                    graph.arrange(60);  // columns in execution order, left to right
                    if (note) {  // the editor's own Note node, below the arranged graph
                        let [left, bottom] = [Infinity, -Infinity];
                        for (const n of graph._nodes) {
                            left = Math.min(left, n.pos[0]); bottom = Math.max(bottom, n.pos[1] + n.size[1]);
                        }
                        const node = window.LiteGraph.createNode("Note");
                        node.widgets[0].value = note;
                        node.title = "How to start the server";
                        graph.add(node);
                        node.pos = [left, bottom + 60];
                        node.size = [760, 200];
                    }
                    // open with the whole graph in view at 1600x1000, below the editor's top bar
                    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
                    for (const n of graph._nodes) {
                        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
                        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
                    }
                    const scale = Math.min(1, 1440 / (x1 - x0), 820 / (y1 - y0));
                    ds.scale = scale;
                    ds.offset = [100 / scale - x0, 110 / scale - y0];
                    graph.setDirtyCanvas(true, true);
                    const ui = graph.serialize();
                    ui.extra = {...(ui.extra || {}), ds: {scale, offset: [...ds.offset]}};
                    return ui;
                }""", args.note)
                if args.screenshot:
                    # the template browser a new user sees first hides the graph: take it off the picture
                    page.evaluate("() => document.querySelectorAll('.p-dialog-mask').forEach(e => e.remove())")
                    page.wait_for_timeout(500)
                    page.screenshot(path=args.screenshot)
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    out = os.path.join(ROOT, "workflows", name + ".json")
    with open(out, "w") as f:
        json.dump(ui, f, indent=2)
        f.write("\n")
    print(out)


if __name__ == "__main__":
    main()
