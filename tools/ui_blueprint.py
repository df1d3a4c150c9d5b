"""Make the subgraph blueprints (subgraphs/NAME.json) in the real ComfyUI editor, as tools/ui_workflow.py makes the
workflows, from the spec tools/blueprints.json:

    python tools/ui_blueprint.py [NAME ...] [--comfyui PATH] [--front-end-root DIR]

Per blueprint, in ComfyUI 0.33.0's editor (default ../shared/comfyui/0.33.0 with the frontend the tests install
beside the project, .comfyui-frontends/1.49.6): loads its workflow's API twin with the frontend's own `loadApiJson`,
lays it out (ui_workflow.layout), gives each single-file loader its properties.models, converts every node but the
spec's `outside` ones into one subgraph with the editor's own `convertToSubgraph` (the links across become the
subgraph's inputs and outputs), shows the spec's widgets on the node through subgraph inputs (as ComfyUI's own
blueprints do) and saves what the editor's "Publish subgraph" saves: the one node and its subgraph definition.
ComfyUI 0.33.0 lists custom_nodes/<pack>/subgraphs/*.json in the node library (app/subgraph_manager.py): its
frontend (1.49.6, stores/subgraphStore.ts) fetches /global_subgraphs after start-up and registers each file as node
type `SubgraphBlueprint.<its /global_subgraphs id>` (a hash, not the name), shown by its file name under
Subgraph Blueprints/<the subgraph's category>; tests/test_comfyui.py finds, inserts and queues them there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ui_workflow as uw  # noqa: E402

SPEC = os.path.join(uw.ROOT, "tools", "blueprints.json")
OUT = os.path.join(uw.ROOT, "subgraphs")
CATEGORY = "Letterpress"
FRONTEND = os.path.join(uw.ROOT, ".comfyui-frontends", "1.49.6", "comfyui_frontend_package", "static")

CONVERT = """([name, spec, lay, fixed]) => {
    const graph = window.app.graph;
    for (const n of graph._nodes) {
        n.pos = lay.pos[String(n.id)];
        if (lay.models[String(n.id)]) n.properties.models = lay.models[String(n.id)];
        for (const w of n.widgets || []) if (fixed.includes(n.type) && w.name === "control_after_generate") w.value = "fixed";
    }
    const inside = new Set(graph._nodes.filter(n => !spec.outside.includes(String(n.id))));
    const ids = new Map([...inside].map(n => [n, String(n.id)]));
    const {node} = graph.convertToSubgraph(inside);
    const sub = node.subgraph;
    for (const [id, widget, label] of spec.promote) {  // as the editor's "promote widget": a subgraph input feeds it
        const inner = sub.nodes.find(n => ids.get(n) === id || String(n.id) === id);
        const w = inner.widgets.find(w => w.name === widget);
        const slot = inner.getSlotFromWidget(w);
        if (slot.link != null) {  // the editor promoted it already on converting (a seed): named as the spec says
            const input = sub.inputs.find(i => i.linkIds.includes(slot.link));
            input.label = label;
            for (const i of node.inputs) if (i._subgraphSlot === input) i.label = label;
            continue;
        }
        const input = sub.addInput(label, String(slot.type ?? w.type));
        if (!input.connect(slot, inner)) throw new Error("cannot promote " + id + "." + widget);
    }
    sub.name = name;
    sub.category = spec.category;
    sub.description = spec.description;
    node.title = name;
    const {nodes, subgraphs} = window.app.canvas._serializeItems([node]);  // what "Publish subgraph" saves
    subgraphs[0].category = spec.category;  // the node library's folder, which the editor reads but does not write
    return JSON.stringify({revision: 0, last_node_id: node.id, last_link_id: 0, nodes, links: [], version: 0.4,
                           definitions: {subgraphs}});
}"""


def make(page, name: str, spec: dict) -> dict:
    api = json.load(open(os.path.join(uw.ROOT, "workflows", "api", spec["workflow"] + "_api.json")))
    uw._load(page, "([api, name]) => window.app.loadApiJson(api, name)", [api, name], len(api))
    sizes = page.evaluate("() => Object.fromEntries(window.app.graph._nodes.map(n => [String(n.id), [...n.size]]))")
    lay = uw.layout(api, sizes, {"note": ""})
    lay["models"] = uw.node_models(api)
    return json.loads(page.evaluate(CONVERT, [name, {**spec, "category": CATEGORY}, lay, uw.FIXED]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="blueprints of tools/blueprints.json (default: all)")
    ap.add_argument("--comfyui", default=os.path.join(uw.ROOT, "..", "shared", "comfyui", "0.33.0")
                    if os.path.isdir(os.path.join(uw.ROOT, "..", "shared", "comfyui", "0.33.0")) else "/work/shared/comfyui/0.33.0")
    ap.add_argument("--front-end-root", default=FRONTEND if os.path.isdir(FRONTEND) else None)
    args = ap.parse_args()
    specs = {k: v for k, v in json.load(open(SPEC)).items() if not k.startswith("_")}
    names = args.names or list(specs)
    apis = [json.load(open(os.path.join(uw.ROOT, "workflows", "api", specs[n]["workflow"] + "_api.json"))) for n in names]
    os.makedirs(OUT, exist_ok=True)
    with uw.editor(args.comfyui, apis, args.front_end_root) as (browser, url):
        for name in names:
            page = uw._open_editor(browser, url)
            blueprint = make(page, name, specs[name])
            page.close()
            out = os.path.join(OUT, name + ".json")
            with open(out, "w") as f:
                json.dump(blueprint, f, indent=2)
                f.write("\n")
            sub = blueprint["definitions"]["subgraphs"][0]
            print(out, f"inputs {[i['name'] for i in sub['inputs']]} outputs {[o['type'] for o in sub['outputs']]}",
                  flush=True)


if __name__ == "__main__":
    main()
