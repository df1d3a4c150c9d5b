"""Headless execution of API-format workflow JSON (what ComfyUI's /prompt queue takes).

The whole workflow is checked before any model loads: JSON, node types, links, required inputs,
socket types, combo values, cycles. Then the nodes that lead to an output node run in dependency
order. Outputs are cached across runs of one Runner by (node, inputs, upstream), as ComfyUI does,
so re-running with a new seed reuses loaded models and text encodings.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import os
from typing import Any

import torch

from .core_nodes import CORE_NODES
from .loaders.errors import LetterpressError
from .loaders.host import get_host
from .nodes import NODE_CLASS_MAPPINGS


class WorkflowError(LetterpressError):
    pass


def load_workflow(path: str) -> dict:
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark (some Windows editors) is fine
            data = json.load(f)
    except FileNotFoundError:
        raise WorkflowError(f"Workflow {path} does not exist.")
    except OSError as e:  # a folder, an unreadable file
        raise WorkflowError(f"Workflow {path} cannot be read ({e.strerror or e}): give an API-format .json file.")
    except ValueError as e:
        raise WorkflowError(f"Workflow {path} is not valid JSON: {e}.")
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise WorkflowError(
            f"{path} is a UI-format workflow (for the editor). The runner takes the API format: use its twin in "
            "workflows/api/ (the same name ending in _api.json), or export it from ComfyUI with 'Export (API)'."
        )
    if isinstance(data, dict) and "prompt" in data and isinstance(data["prompt"], dict):
        data = data["prompt"]  # a /prompt request body
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "class_type" in v
                                             and isinstance(v.get("inputs", {}), dict) for v in data.values()):
        raise WorkflowError(f"{path} is not an API-format workflow (node id -> {{class_type, inputs}}).")
    return data


def _is_link(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


def _all_inputs(cls) -> dict:
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def set_values(workflow: dict, assignments: list[str]) -> dict:
    """Apply `--set KEY=VALUE`: KEY is 'NODE_ID.input', or an input name that one node has (or that the
    node titled like it has, e.g. the 'Prompt' text encode for `prompt`), or the title of a node with one
    setting (a Primitive titled 'Width' that feeds two nodes takes `width`)."""
    wf = copy.deepcopy(workflow)
    for item in assignments:
        if "=" not in item:
            raise WorkflowError(f"--set {item}: use KEY=VALUE.")
        key, value = item.split("=", 1)
        if "." in key:  # NODE_ID.input
            nid, name = key.split(".", 1)
            if nid not in wf:
                raise WorkflowError(f"--set {key}: this workflow has no node {nid} (nodes: {', '.join(wf)}).")
            inputs = wf[nid].get("inputs", {})
            if name not in inputs or _is_link(inputs[name]):
                settable = ", ".join(_settable(wf[nid])) or "none"
                raise WorkflowError(f"--set {key}: node {nid} ({wf[nid].get('class_type')}) has no input '{name}' "
                                    f"to set (its inputs: {settable}).")
            targets = [(nid, name)]
        else:
            having = [nid for nid, n in wf.items() if key in n.get("inputs", {}) and not _is_link(n["inputs"][key])]
            titled = [nid for nid in having if _title_is(wf[nid], key)]
            chosen = titled or having
            # failing those, a node titled KEY with one setting, e.g. a Primitive titled Width that feeds two nodes
            single = [(nid, _settable(n)[0]) for nid, n in wf.items()
                      if _title_is(n, key) and len(_settable(n)) == 1 and nid not in having]
            if single and (having or len(single) > 1):
                opts = ", ".join([f"{nid}.{key}" for nid in having] + [f"{nid}.{name}" for nid, name in single])
                raise WorkflowError(f"--set {key}: {len(having) + len(single)} nodes take '{key}' by input name or "
                                    f"title (choices: {opts}). Name one as ID.input.")
            if single:
                targets = single
            elif not having:
                names = {k for n in wf.values() for k, v in n.get("inputs", {}).items() if not _is_link(v)}
                titles = {n["_meta"]["title"].lower().replace(" ", "_") for n in wf.values()
                          if len(_settable(n)) == 1 and n.get("_meta", {}).get("title")}
                raise WorkflowError(f"--set {key}: no node of this workflow has an input '{key}' "
                                    f"(inputs you can set: {', '.join(sorted(names | titles))}).")
            elif len(chosen) != 1:
                opts = ", ".join(f"{nid}.{key}" for nid in having)
                raise WorkflowError(f"--set {key}: {len(chosen)} nodes take '{key}' (choices: {opts}). Name one as ID.{key}.")
            else:
                targets = [(chosen[0], key)]
        for nid, name in targets:
            inputs = wf[nid]["inputs"]
            inputs[name] = _convert(value, inputs.get(name), f"{nid}.{name}")
    return wf


PRIMITIVES = ("PrimitiveInt", "PrimitiveString", "PrimitiveStringMultiline")


def _primitive_value(wf: dict, value: Any) -> Any:
    """The value a link from a Primitive (Int, String) carries (when it is typed in that node), else `value`
    unchanged."""
    if _is_link(value) and value[1] == 0:
        src = wf.get(value[0], {})
        typed = src.get("inputs", {}).get("value")
        if src.get("class_type") in PRIMITIVES and not _is_link(typed):
            return typed
    return value


def _settable(node: dict) -> list[str]:
    return [k for k, v in node.get("inputs", {}).items() if not _is_link(v)]


def _title_is(node: dict, key: str) -> bool:
    return node.get("_meta", {}).get("title", "").lower().replace(" ", "_") == key.lower()


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _is_out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()


def _convert(value: str, old: Any, where: str) -> Any:
    try:
        if isinstance(old, bool):
            if value.lower() not in _TRUE + _FALSE:
                raise ValueError(value)
            return value.lower() in _TRUE
        if isinstance(old, int):
            return int(value)
        if isinstance(old, float):
            return float(value)
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number"}[type(old)]
        raise WorkflowError(f"--set {where}={value}: expected {expected}.")
    return value


class Runner:
    def __init__(self, nodes: dict | None = None):
        self.nodes = dict(CORE_NODES)
        self.nodes.update(nodes or NODE_CLASS_MAPPINGS)
        self.cache: dict[str, tuple] = {}  # node signature -> outputs, for the nodes of the last workflow run
        self.executed: list[str] = []  # node ids run (not cached) in the last run

    # validation --------------------------------------------------------------------------------
    def validate(self, wf: dict, pending: frozenset = frozenset()) -> list[str]:
        """Check everything that can be checked without running; return the execution order. The nodes in
        `pending` (loaders whose files are about to be downloaded) skip their own file check."""
        core = ", ".join(CORE_NODES)
        problems = [f"node {nid}: unknown node type '{n.get('class_type')}'. The headless runner has this pack's nodes "
                    f"and, of ComfyUI's own, {core}; run other nodes inside ComfyUI (with the packs that provide them)"
                    for nid, n in wf.items() if n.get("class_type") not in self.nodes]
        if problems:
            raise WorkflowError("The workflow cannot run:\n- " + "\n- ".join(problems))
        order = self.order(wf)
        for nid in order:  # as ComfyUI: nodes that feed no output are not checked (nor run)
            node = wf[nid]
            ctype = node["class_type"]
            cls = self.nodes[ctype]
            spec = cls.INPUT_TYPES()
            inputs = node.get("inputs", {})
            for name, ispec in spec.get("required", {}).items():
                if name not in inputs:
                    problems.append(f"node {nid} ({ctype}): required input '{name}' is missing")
            # a value wired from a Primitive is checked as if it were typed into the widget
            inputs = {k: _primitive_value(wf, v) for k, v in inputs.items()}
            # as ComfyUI: the inputs the node's VALIDATE_INPUTS takes (all of them, with **kwargs) skip the list
            # and range checks, which the node's own check replaces (e.g. a loader naming what a folder holds)
            wanted = inspect.signature(cls.VALIDATE_INPUTS).parameters if hasattr(cls, "VALIDATE_INPUTS") else {}
            any_input = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in wanted.values())
            for name, value in inputs.items():
                ispec = _all_inputs(cls).get(name)
                if ispec is None:
                    continue  # extra widgets (e.g. control_after_generate) are ignored, as ComfyUI does
                own = name in wanted or any_input
                problems.extend(self._check_input(wf, nid, ctype, name, value, ispec, own))
            if hasattr(cls, "VALIDATE_INPUTS") and nid not in pending:  # the node's own checks, as ComfyUI runs them: literal values only
                literal = {k: v for k, v in inputs.items()
                           if (k in wanted or (any_input and k in _all_inputs(cls))) and not _is_link(v)}
                verdict = cls.VALIDATE_INPUTS(**literal)
                if verdict is not True:
                    problems.append(f"node {nid} ({ctype}): {verdict}")
        if problems:
            raise WorkflowError("The workflow cannot run:\n- " + "\n- ".join(problems))
        return order

    def _check_input(self, wf, nid, ctype, name, value, ispec, own: bool = False) -> list[str]:
        """What is wrong with one input; `own`: the node's VALIDATE_INPUTS checks its list and range."""
        kind = ispec[0]
        opts = ispec[1] if len(ispec) > 1 else {}
        where = f"node {nid} ({ctype}) input '{name}'"
        if _is_link(value):
            src, slot = value
            if src not in wf:
                return [f"{where} is linked to node {src}, which is not in the workflow"]
            scls = self.nodes.get(wf[src].get("class_type"))
            if scls is None:
                return []
            if slot >= len(scls.RETURN_TYPES):
                return [f"{where} is linked to output {slot} of node {src}, which has {len(scls.RETURN_TYPES)}"]
            got = scls.RETURN_TYPES[slot]
            want = kind if isinstance(kind, str) else "COMBO"
            combo_ok = isinstance(kind, list) and (got in ("*", "COMBO") or isinstance(got, list))
            if want != got and "*" not in (want, got) and not combo_ok:
                return [f"{where} needs {want} but is linked to a {got} output of node {src} ({wf[src]['class_type']})"]
            return []
        if isinstance(kind, list):
            if value not in kind and not own:
                if not kind:
                    return [f"{where}: '{value}' is not available: nothing of that kind was found. Check --models-dir "
                            f"({get_host().models_dir}): it should be a folder laid out like ComfyUI's models/"]
                shown = ", ".join(map(str, kind[:8])) + (f", ... ({len(kind)} in all)" if len(kind) > 8 else "")
                return [f"{where}: '{value}' is not available (choices: {shown})"]
        elif kind == "INT" and (not isinstance(value, int) or isinstance(value, bool)):
            return [f"{where}: expected an integer, got {value!r}"]
        elif kind == "FLOAT" and not isinstance(value, (int, float)):
            return [f"{where}: expected a number, got {value!r}"]
        elif kind in ("INT", "FLOAT"):
            if not math.isfinite(value):
                return [f"{where}: expected a finite number, got {value}"]
            lo, hi = (None, None) if own else (opts.get("min"), opts.get("max"))
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                return [f"{where}: {value} is outside [{lo}, {hi}]"]
        elif kind == "STRING" and not isinstance(value, str):
            return [f"{where}: expected text, got {value!r}"]
        elif kind == "BOOLEAN" and not isinstance(value, bool):
            return [f"{where}: expected true/false, got {value!r}"]
        elif kind not in ("INT", "FLOAT", "STRING", "BOOLEAN"):
            return [f"{where} needs a {kind} link, got the value {value!r}"]
        return []

    def order(self, wf: dict) -> list[str]:
        """The nodes that feed an output node, each after its inputs (what runs; the rest is neither checked nor run)."""
        outputs = [nid for nid, n in wf.items() if getattr(self.nodes[n["class_type"]], "OUTPUT_NODE", False)]
        if not outputs:
            raise WorkflowError("The workflow has no output node (SaveImage, PreviewImage, ...): nothing would run.")
        order: list[str] = []
        state: dict[str, int] = {}

        def visit(nid: str, path: list[str]):
            if state.get(nid) == 2 or nid not in wf:  # a link to a missing node is reported by validate
                return
            if state.get(nid) == 1:
                cycle = path[path.index(nid):] + [nid]
                raise WorkflowError(f"The workflow has a cycle: {' -> '.join(cycle)}.")
            state[nid] = 1
            for v in wf[nid].get("inputs", {}).values():
                if _is_link(v):
                    visit(v[0], path + [nid])
            state[nid] = 2
            order.append(nid)

        for nid in sorted(outputs, key=lambda x: (len(x), x)):
            visit(nid, [])
        return order

    # execution ---------------------------------------------------------------------------------
    def _signature(self, wf: dict, nid: str, sigs: dict[str, str]) -> str:
        """What a node's output depends on: its type, typed values, IS_CHANGED and its inputs' signatures
        (not its id: two identical nodes share one result, as in ComfyUI's cache)."""
        node = wf[nid]
        cls = self.nodes[node["class_type"]]
        parts = [node["class_type"]]
        for name, value in sorted(node.get("inputs", {}).items()):
            if _is_link(value):
                parts.append(f"{name}<-{sigs[value[0]]}:{value[1]}")
            elif name in _all_inputs(cls):
                parts.append(f"{name}={json.dumps(value, sort_keys=True)}")
        if hasattr(cls, "IS_CHANGED"):  # e.g. LoadImage: a file changed under the same name
            literal = {k: v for k, v in node.get("inputs", {}).items() if not _is_link(v) and k in _all_inputs(cls)}
            parts.append(f"changed={cls.IS_CHANGED(**literal)}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def run(self, wf: dict, extra_pnginfo: dict | None = None) -> dict[str, Any]:
        order = self.validate(wf)
        get_host().request_interrupt(False)  # a Cancel that came after the last run does not stop this one (as ComfyUI)
        sigs: dict[str, str] = {}
        for nid in order:
            sigs[nid] = self._signature(wf, nid, sigs)
        # Drop what this workflow no longer uses before anything runs (as ComfyUI does), so a model whose loader
        # changed leaves memory before its replacement loads.
        used = set(sigs.values())
        self.cache = {sig: out for sig, out in self.cache.items() if sig in used}
        results: dict[str, tuple] = {}
        ui: dict[str, Any] = {}
        self.executed = []
        for nid in order:
            node = wf[nid]
            cls = self.nodes[node["class_type"]]
            is_output = getattr(cls, "OUTPUT_NODE", False)
            if sigs[nid] in self.cache and not is_output:
                results[nid] = self.cache[sigs[nid]]
                continue
            kwargs = {name: results[value[0]][value[1]] if _is_link(value) else value
                      for name, value in node.get("inputs", {}).items() if _is_link(value) or name in _all_inputs(cls)}
            hidden = cls.INPUT_TYPES().get("hidden", {})
            if "prompt" in hidden:
                kwargs["prompt"] = wf
            if "extra_pnginfo" in hidden:
                kwargs["extra_pnginfo"] = extra_pnginfo
            try:
                out = getattr(cls(), cls.FUNCTION)(**kwargs)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not _is_out_of_memory(e):
                    raise
                raise LetterpressError(
                    f"Out of memory in node {nid} ({node['class_type']}): {str(e).splitlines()[0][:200]}. Lower the "
                    "size or the batch, load the weights as bf16 or fp8_e4m3fn, or close other programs."
                ) from None
            self.executed.append(nid)
            if isinstance(out, dict):
                ui[nid] = out.get("ui")
                out = tuple(out.get("result", ()))
            results[nid] = out
            if not is_output:
                self.cache[sigs[nid]] = out
        return {"outputs": ui, "results": results}
