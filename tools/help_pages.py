"""Writes web/docs/<NodeName>.md, the help page ComfyUI's editor shows for each node (letterpress/nodes/help.py),
and removes pages of nodes that are gone: `python tools/help_pages.py` from the clone (the pack importable as
`letterpress`, e.g. installed with pip install -e .)."""

from __future__ import annotations

import os

from letterpress.loaders.host import StandaloneHost, set_host
from letterpress.nodes.help import DOCS, pages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    set_host(StandaloneHost())
    folder = os.path.join(ROOT, DOCS)
    os.makedirs(folder, exist_ok=True)
    wanted = pages()
    for name in set(os.listdir(folder)) - set(wanted):
        os.remove(os.path.join(folder, name))
    for name, text in wanted.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)
    print(f"{len(wanted)} pages in {folder}")


if __name__ == "__main__":
    main()
