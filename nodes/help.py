"""Each node's help page, as ComfyUI's editor fetches it for a custom node: `/extensions/<pack>/docs/<NodeName>.md`
(then `<NodeName>/<locale>.md`), i.e. `web/docs/<NodeName>.md` under the pack's WEB_DIRECTORY (the frontend's
NodeHelpService, comfyui-frontend-package 1.35 to 1.49; without a page it shows the description and tooltips).

A page is the node's DESCRIPTION, its inputs with their tooltips, its outputs, and for a loader the model files
it takes with where to download them (loaders/explain.py's models(): the families' SPEC.sources). `python
tools/help_pages.py` writes them; a test holds the files equal to `page()`.
"""

from __future__ import annotations

from ..loaders.explain import models
from ..loaders.families import title

DOCS = "web/docs"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _kind(spec) -> str:
    kind = spec[0]
    if isinstance(kind, (list, tuple)):
        return "choice"
    return kind.lower() if kind in ("INT", "FLOAT", "STRING", "BOOLEAN") else kind


def _models(cls) -> list[str]:
    """The model-files section of a loader: the sources of its family and role (a folder loader: the folders)."""
    family = getattr(cls, "FAMILY", "")
    if getattr(cls, "INPUT", ""):
        own = [s for s in models() if s.family == family and s.role == cls.ROLE and s.kind == cls.KIND]
    elif getattr(cls, "PARTS", None) is not None:
        own = [s for s in models() if s.family == family and s.role == "folder"]
    else:
        return []
    rows = ["## Model files", "", "| name | put it in | download |", "|---|---|---|"]
    for s in own:
        name = s.name + ("/" if s.role == "folder" else "")
        link = f"[{s.repo}/{s.file}]({s.url})" if s.file else f"[{s.repo}]({s.url}) (the whole repository)"
        rows.append(f"| `{name}` | `models/{s.kind}/` | {link} |")
    tail = (f"The headless runner's `--download` fetches what a workflow reads of these. More in the README's "
            f"Model files section ({title(family)}).")
    return rows + ["", tail, ""]


def page(name: str, cls, display: str) -> str:
    lines = [f"# {display}", "", cls.DESCRIPTION, ""]
    spec = cls.INPUT_TYPES()
    inputs = [(k, v, group) for group in ("required", "optional") for k, v in spec.get(group, {}).items()]
    if inputs:
        lines += ["## Inputs", "", "| input | type | what it does |", "|---|---|---|"]
        for key, value, group in inputs:
            opts = value[1] if len(value) > 1 else {}
            extra = " (optional)" if group == "optional" else ""
            lines.append(f"| `{key}`{extra} | {_kind(value)} | {_cell(opts.get('tooltip', ''))} |")
        lines.append("")
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    if cls.RETURN_TYPES:
        tips = getattr(cls, "OUTPUT_TOOLTIPS", None)
        if tips:
            lines += ["## Outputs", "", "| output | type | what it is |", "|---|---|---|"]
            lines += [f"| `{n}` | {t} | {_cell(tip)} |" for n, t, tip in zip(names, cls.RETURN_TYPES, tips)]
        else:
            lines += ["## Outputs", "", "| output | type |", "|---|---|"]
            lines += [f"| `{n}` | {t} |" for n, t in zip(names, cls.RETURN_TYPES)]
        lines.append("")
    lines += _models(cls)
    return "\n".join(lines).rstrip() + "\n"


def pages() -> dict[str, str]:
    """{file name under web/docs: text} for every node of the pack (with no models folder: file lists empty)."""
    from . import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    return {f"{name}.md": page(name, cls, NODE_DISPLAY_NAME_MAPPINGS.get(name, name))
            for name, cls in NODE_CLASS_MAPPINGS.items()}
