"""Every shipped API workflow checked against the pack's node definitions, on a models tree that holds the
files the workflows name (the tiny models, saved under the names users have)."""

from __future__ import annotations

import glob
import json
import os

import pytest
from fixtures.common import capture_previews
from letterpress.runner import Runner, load_workflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API = sorted(glob.glob(os.path.join(ROOT, "workflows", "api", "*_api.json")))


def test_every_family_has_a_shipped_api_workflow():
    names = " ".join(os.path.basename(p) for p in API)
    for family in ("ernie_image", "ovis_image", "glm_image", "ernie_vl", "text_best_of_4", "ernie_image_remote",
                   "glm_image_remote"):
        assert family in names


def test_remote_workflows_say_how_to_start_their_server():
    """Each UI workflow with a Remote node carries a Note with the engine's serve command."""
    commands = {"LetterpressErnieImageRemote": "sglang serve --model-path baidu/ERNIE-Image",
                "LetterpressGlmImageRemote": "vllm serve zai-org/GLM-Image --omni"}
    found = 0
    for path in sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json"))):
        ui = json.load(open(path))
        notes = " ".join(str(v) for n in ui["nodes"] if n["type"] == "Note" for v in n.get("widgets_values", []))
        for node in ui["nodes"]:
            if node["type"] in commands:
                found += 1
                assert commands[node["type"]] in notes, path
    assert found == 2


@pytest.mark.parametrize("path", API, ids=[os.path.basename(p) for p in API])
def test_api_workflow_is_valid_for_the_pack(shipped_models, host, tmp_path, path):
    from PIL import Image

    wf = load_workflow(path)
    host.input_dir = str(tmp_path)  # the pictures a workflow loads must exist before it runs
    for node in wf.values():
        if node["class_type"] == "LoadImage":
            Image.new("RGB", (64, 64), (200, 120, 40)).save(tmp_path / node["inputs"]["image"])
    order = Runner().validate(wf)  # node types, required inputs, links and their types, ranges, combo files
    assert set(order) <= set(wf) and order
    for node in wf.values():
        assert node.get("_meta", {}).get("title"), f"{node['class_type']} has no title"
    json.dumps(wf)


# UI-format workflows (made in the ComfyUI editor) ---------------------------------------------------------

UI = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))


def api_twin(ui_path: str) -> str:
    """workflows/NAME.json -> workflows/api/NAME_api.json (kept apart: ComfyUI's template browser lists only
    the files directly in workflows/, which the editor can open)."""
    folder, name = os.path.split(ui_path)
    return os.path.join(folder, "api", name[:-5] + "_api.json")
CONTROL = {"fixed", "increment", "decrement", "randomize"}
# The editor's own nodes that never reach the server (graphToPrompt leaves them out): the Remote workflows carry
# a Note on how to start their server, which the API twin cannot hold (ComfyUI's /prompt refuses the type).
EDITOR_ONLY = {"Note", "MarkdownNote"}


def queued_nodes(ui: dict) -> list[dict]:
    return [n for n in ui["nodes"] if n["type"] not in EDITOR_ONLY]
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def _classes():
    from letterpress.core_nodes import CORE_NODES
    from letterpress.nodes import NODE_CLASS_MAPPINGS

    return {**CORE_NODES, **NODE_CLASS_MAPPINGS}


def widget_slots(cls) -> list[tuple[str, tuple | None]]:
    """The widgets_values layout the editor writes: one slot per widget input (linked or not), in
    definition order, plus the control_after_generate slot after a seed and the upload slot of LoadImage."""
    spec = cls.INPUT_TYPES()
    slots = []
    for name, s in {**spec.get("required", {}), **spec.get("optional", {})}.items():
        opts = s[1] if len(s) > 1 else {}
        if (isinstance(s[0], list) or s[0] in WIDGET_TYPES) and not opts.get("forceInput"):
            slots.append((name, s))
            if opts.get("control_after_generate"):
                slots.append(("control_after_generate", None))
            if opts.get("image_upload"):
                slots.append(("upload", None))
    return slots




def ui_to_api(ui: dict) -> dict:
    """What the editor queues for this UI workflow (widgets by slot, links by id; notes left out)."""
    classes = _classes()
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in queued_nodes(ui):
        cls = classes[node["type"]]
        inputs = {}
        values = list(node.get("widgets_values") or [])
        for (name, _), value in zip(widget_slots(cls), values):
            if name not in ("control_after_generate", "upload"):
                inputs[name] = value
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def test_every_ui_workflow_has_an_api_twin():
    assert {os.path.basename(p)[:-5] for p in UI} == {os.path.basename(p)[:-9] for p in API}


def test_the_template_folder_holds_only_editor_files():
    """ComfyUI lists every workflows/*.json of a pack in its template browser, which opens UI-format files only."""
    for path in UI:
        data = json.load(open(path))
        assert "nodes" in data and "links" in data, f"{path} is not a UI-format workflow"


@pytest.mark.parametrize("path", UI, ids=[os.path.basename(p) for p in UI])
def test_ui_workflow_fits_the_node_definitions(shipped_models, path):
    ui = json.load(open(path))
    classes = _classes()
    by_id = {n["id"]: n for n in ui["nodes"]}
    for node in ui["nodes"]:
        if node["type"] in EDITOR_ONLY:
            assert not node.get("inputs") and not node.get("outputs"), "an editor-only node takes no links"
            continue
        assert node["type"] in classes, f"missing node type {node['type']}"
        cls = classes[node["type"]]
        slots = widget_slots(cls)
        values = node.get("widgets_values") or []
        assert len(values) == len(slots), f"{node['type']}: {len(values)} widget values for {len(slots)} slots"
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for (name, spec), value in zip(slots, values):
            if name == "control_after_generate":
                assert value in CONTROL
            elif spec is not None and name not in linked:
                kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
                if isinstance(kind, list):
                    assert value in kind, f"{node['type']}.{name}: {value!r} not among the choices"
                elif kind in ("INT", "FLOAT"):
                    assert isinstance(value, (int, float)) and opts.get("min", value) <= value <= opts.get("max", value)
                elif kind == "BOOLEAN":
                    assert isinstance(value, bool)
                else:
                    assert isinstance(value, str)
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        src_cls, dst_node = classes[by_id[src]["type"]], by_id[dst]
        dst_input = dst_node["inputs"][dst_slot]
        spec = {**classes[dst_node["type"]].INPUT_TYPES().get("required", {}),
                **classes[dst_node["type"]].INPUT_TYPES().get("optional", {})}[dst_input["name"]]
        accepts = spec[0] if isinstance(spec[0], str) else "COMBO"
        # the editor types a link into an input of any type (Preview Any's source) as "*"
        assert src_cls.RETURN_TYPES[src_slot] == kind or kind == accepts == "*", f"link {link_id} carries {kind}"
        assert accepts in (kind, "*") or isinstance(spec[0], list)


@pytest.mark.parametrize("path", UI, ids=[os.path.basename(p) for p in UI])
def test_ui_workflow_queues_as_its_api_twin(path):
    api = load_workflow(api_twin(path))
    ours = ui_to_api(json.load(open(path)))
    classes = _classes()

    def declared(node):  # the editor also queues widgets of its own (Preview Any's text box); ComfyUI ignores them
        spec = classes[node["class_type"]].INPUT_TYPES()
        names = {**spec.get("required", {}), **spec.get("optional", {})}
        return {k: v for k, v in node["inputs"].items() if k in names}

    assert ours == {k: {"class_type": v["class_type"], "inputs": declared(v)} for k, v in api.items()}


# properties.models: the download the editor offers for each single file a loader picks -------------------------

BLUEPRINTS = sorted(glob.glob(os.path.join(ROOT, "subgraphs", "*.json")))


def all_nodes(ui: dict) -> list[dict]:
    """The nodes of a UI workflow or blueprint, those inside its subgraph definitions included."""
    return ui["nodes"] + [n for sg in ui.get("definitions", {}).get("subgraphs", []) for n in sg["nodes"]]


def picked(node: dict, cls, name: str):
    """The value of widget `name` of a saved node (kept in widgets_values also where a subgraph input feeds it)."""
    names = [n for n, _ in widget_slots(cls)]
    return node["widgets_values"][names.index(name)]


@pytest.mark.parametrize("path", UI + BLUEPRINTS, ids=[os.path.relpath(p, ROOT) for p in UI + BLUEPRINTS])
def test_single_file_loaders_name_their_download_as_the_table_of_sources_does(path):
    """Every properties.models entry is the file, URL and folder of loaders/explain.py's table (as ComfyUI's
    templates write them), and every single-file loader picking a file the table knows carries exactly it."""
    from letterpress.loaders.explain import file_source
    from letterpress.nodes.common import FileLoader

    classes = _classes()
    for node in all_nodes(json.load(open(path))):
        models = node.get("properties", {}).get("models", [])
        for entry in models:
            source = file_source(entry["directory"], entry["name"])
            assert source is not None and entry == source.as_model(), f"{node['type']}: {entry}"
        cls = classes.get(node["type"])
        if isinstance(cls, type) and issubclass(cls, FileLoader):
            name = picked(node, cls, cls.INPUT)
            want = [file_source(cls.KIND, name).as_model()] if file_source(cls.KIND, name) else []
            assert models == want, f"{node['type']} picks {name}"


def test_the_single_file_workflows_carry_downloads():
    """The checks above hold on something: the workflows of single files name each of their files."""
    named = {m["name"] for path in UI + BLUEPRINTS for node in all_nodes(json.load(open(path)))
             for m in node.get("properties", {}).get("models", [])}
    assert {"ernie-image.safetensors", "ministral-3-3b.safetensors", "flux2-vae.safetensors",
            "ernie-image-turbo-Q4_K_M.gguf"} <= named


@pytest.mark.parametrize("workflow", ["ovis_image_t2i_api.json", "glm_image_t2i_api.json"])
def test_other_families_send_live_previews(shipped_models, host, workflow):
    from letterpress.runner import set_values

    shown = capture_previews(host)
    host.previews = True
    wf = load_workflow(os.path.join(ROOT, "workflows", "api", workflow))
    sizes = [f"{nid}.{k}={64}" for nid, n in wf.items() for k in ("width", "height")
             if isinstance(n["inputs"].get(k), int)]
    Runner().run(set_values(wf, sizes + [f"{nid}.steps=2" for nid, n in wf.items() if "steps" in n["inputs"]]))
    images = [p for p in shown if p is not None]
    assert len(images) == 2 and images[0].size[0] == images[0].size[1]


def test_every_node_has_a_description_and_every_input_a_tooltip():
    """The editor shows a node's DESCRIPTION and each input's tooltip on hover: none may be left empty."""
    from letterpress.nodes import NODE_CLASS_MAPPINGS

    bare = []
    for name, cls in NODE_CLASS_MAPPINGS.items():
        if not getattr(cls, "DESCRIPTION", "").strip():
            bare.append(f"{name} (DESCRIPTION)")
        for section in cls.INPUT_TYPES().values():
            for key, spec in section.items():
                if not (len(spec) > 1 and str(spec[1].get("tooltip", "")).strip()):
                    bare.append(f"{name}.{key}")
    assert bare == []


# How the UI workflows open: laid out left to right, nothing overlapping, all in view --------------------------

TITLE_BAR = 30  # LiteGraph draws a node's title bar above its pos
VIEW = (1600, 1000)
# below this scale the editor draws nodes as blank boxes, without titles or widgets: LiteGraph's
# Canvas.MinFontSizeForLOD (8 px) over its NODE_TEXT_SIZE (14 px)
READABLE = 8 / 14


def _boxes(ui: dict) -> dict:
    """Each node's drawn box (title bar included) in graph units: id -> (x0, y0, x1, y1)."""
    return {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_BAR, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
            for n in ui["nodes"]}


def _meet(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _row_below(ui: dict, boxes: dict, src: int, dst: int) -> bool:
    """Whether `dst` lies in a row under `src`'s: its group (or itself, in none) wholly below `src`'s group (or it)."""
    def outer(nid):
        b = boxes[nid]
        for g in ui.get("groups", []):
            x, y, w, h = g["bounding"]
            if x <= b[0] and b[2] <= x + w and y <= b[1] and b[3] <= y + h:
                return (x, y, x + w, y + h)
        return b
    return outer(dst)[1] > outer(src)[3]


def _rank(node_type: str) -> int | None:
    """Stage order of the nodes every workflow has (its own table: loaders, DiT sample, VAE decode, save)."""
    for rank, words in enumerate((("Loader",), ("Sampler",), ("VAEDecode",), ("SaveImage",))):
        if any(w in node_type for w in words) and "Lora" not in node_type:
            return rank
    return None


@pytest.mark.parametrize("path", UI, ids=[os.path.basename(p) for p in UI])
def test_ui_workflow_reads_at_a_glance(path):
    ui = json.load(open(path))
    boxes = _boxes(ui)
    ids = sorted(boxes)
    overlapping = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:] if _meet(boxes[a], boxes[b])]
    assert overlapping == []
    # opened at 1600x1000 with the stored view (the editor draws graph point p at (p + offset) * scale), large
    # enough that the editor draws the nodes' titles and widgets
    ds = ui["extra"]["ds"]
    assert ds["scale"] >= READABLE, f"opens at scale {ds['scale']}, where nodes show as blank boxes"
    groups = [g["bounding"] for g in ui.get("groups", [])]
    rects = list(boxes.values()) + [(g[0], g[1], g[0] + g[2], g[1] + g[3]) for g in groups]
    for x0, y0, x1, y1 in rects:
        sx0, sy0 = (x0 + ds["offset"][0]) * ds["scale"], (y0 + ds["offset"][1]) * ds["scale"]
        sx1, sy1 = (x1 + ds["offset"][0]) * ds["scale"], (y1 + ds["offset"][1]) * ds["scale"]
        assert 0 <= sx0 and sx1 <= VIEW[0] and 0 <= sy0 and sy1 <= VIEW[1], (x0, y0, x1, y1)
    # every wire runs left to right (or on into a row under it), and the stages follow each other left to right
    by_id = {n["id"]: n for n in ui["nodes"]}
    for _, src, _, dst, _, _ in ui["links"]:
        assert boxes[src][2] < boxes[dst][0] or _row_below(ui, boxes, src, dst), \
            f"link {by_id[src]['type']} -> {by_id[dst]['type']} runs right to left"
    ranked = [(r, n["id"]) for n in ui["nodes"] if (r := _rank(n["type"])) is not None]
    for ra, a in ranked:
        for rb, b in ranked:
            if ra < rb:
                assert boxes[a][0] < boxes[b][0] or _row_below(ui, boxes, a, b)
    # a note says which files the workflow needs
    notes = [n for n in ui["nodes"] if n["type"] in EDITOR_ONLY]
    text = notes[0]["widgets_values"][0] if notes else ""
    # which files go where (a remote workflow: how to start the server that holds the model)
    assert len(notes) == 1 and ("models/" in text or " serve " in text)
    # groups: titled, apart from each other, and no node half in one
    for i, g in enumerate(groups):
        assert ui["groups"][i]["title"]
        box = (g[0], g[1], g[0] + g[2], g[1] + g[3])
        for h in groups[i + 1:]:
            assert not _meet(box, (h[0], h[1], h[0] + h[2], h[1] + h[3]))
        for b in boxes.values():
            inside = box[0] <= b[0] and b[2] <= box[2] and box[1] <= b[1] and b[3] <= box[3]
            assert inside or not _meet(box, b), "a node lies across a group's border"


def test_workflows_with_more_than_one_model_have_a_group_per_model():
    for path in UI:
        ui = json.load(open(path))
        types = " ".join(n["type"] for n in ui["nodes"])
        remote = "Remote" in types  # the image model runs on a server: no AR/DiT pair here
        models = sum(("ErnieVL" in types, "ErnieImage" in types, "Glm" in types)) + ("TextRead" in types) \
            + ("PromptEnhance" in types) + ("Glm" in types and not remote)  # GLM-Image: an AR model and a DiT
        if models > 1:
            assert len(ui.get("groups", [])) >= 2, path
