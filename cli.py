"""`python -m letterpress run WORKFLOW_api.json [--models-dir DIR] --set prompt="..."`"""

from __future__ import annotations

import argparse
import os
import sys

from .loaders.errors import LetterpressError
from .loaders.host import StandaloneHost, set_host


def _parser() -> argparse.ArgumentParser:
    prog = "letterpress" if os.path.basename(sys.argv[0]) == "letterpress" else "python -m letterpress"
    p = argparse.ArgumentParser(prog=prog, description="Run Letterpress workflows headless.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an API-format workflow JSON")
    run.add_argument("workflow", help="API-format workflow (e.g. a file of workflows/api/)")
    run.add_argument("--models-dir", help="a folder laid out like ComfyUI's models/ (diffusers/, diffusion_models/, "
                     "text_encoders/, vae/); default $LETTERPRESS_MODELS_DIR, else ./models")
    run.add_argument("--output-dir", help="where images are written (never overwritten); default "
                     "$LETTERPRESS_OUTPUT_DIR, else ./output")
    run.add_argument("--input-dir", help="where LoadImage looks for images; default $LETTERPRESS_INPUT_DIR, else ./input")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="change an input: NODE_ID.input=value, or an input name such as prompt, seed, width")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    run.add_argument("--download", action="store_true", help="first download from the Hugging Face Hub what the "
                     "workflow's loaders read and the models folder lacks (only those files; an interrupted download "
                     "goes on where it stopped)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def check_device(name: str, where: str = "--device ") -> None:
    """A clear error, before anything loads, for a device this torch cannot use."""
    import torch

    try:
        torch.empty(1, device=torch.device(name))
    except (RuntimeError, AssertionError, ValueError) as e:
        raise LetterpressError(
            f"{where}{name}: this torch ({torch.__version__}) cannot use it ({str(e).splitlines()[0]}). "
            "Use cpu, leave --device out for the best available, or install a torch build for that device."
        ) from None


def _missing(runner, wf: dict) -> dict:
    """node id -> the downloads its loader needs (empty when the workflow's files are all there)."""
    from .loaders.download import plan

    try:
        return plan(wf, runner.nodes, runner.order(wf))
    except LetterpressError:  # a workflow that cannot be ordered says so when it is validated
        return {}


def _download(runner, wf: dict, progress: bool) -> None:
    """Check the whole workflow but the files about to be fetched, fetch them, and leave the run to check it all."""
    from .loaders.download import fetch

    wanted = _missing(runner, wf)
    runner.validate(wf, pending=frozenset(wanted))
    fetch(wanted, progress)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .runner import Runner, WorkflowError, load_workflow, set_values

    wf = None
    try:
        if args.device:
            check_device(args.device)
            os.environ["LETTERPRESS_DEVICE"] = args.device
        elif os.environ.get("LETTERPRESS_DEVICE"):
            check_device(os.environ["LETTERPRESS_DEVICE"], "LETTERPRESS_DEVICE=")
        host = StandaloneHost()
        for name in ("models_dir", "output_dir", "input_dir"):  # a flag wins over the host's environment default
            setattr(host, name, os.path.abspath(getattr(args, name) or getattr(host, name)))
        host.show_progress = not args.quiet
        if args.quiet:  # also the loading bars of diffusers and transformers
            import diffusers
            import transformers

            for lib in (diffusers, transformers):
                lib.utils.logging.disable_progress_bar()
        set_host(host)
        runner = Runner()
        wf = set_values(load_workflow(args.workflow), args.set)
        if args.download:
            _download(runner, wf, progress=not args.quiet)
        result = runner.run(wf)
    except WorkflowError as e:
        hint = "" if args.download or wf is None or not _missing(runner, wf) else (
            "\nRun again with --download to fetch the missing model files from the Hugging Face Hub.")
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    except LetterpressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130
    for nid, ui in result["outputs"].items():
        for text in (ui or {}).get("text", []):  # Preview Any: shown, but apart from the image paths on stdout
            title = wf[nid].get("_meta", {}).get("title", wf[nid]["class_type"])
            print(f"[{title}] {text}", file=sys.stderr)
        for img in (ui or {}).get("images", []):
            print(img["path"])
    return 0
