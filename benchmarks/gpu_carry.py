"""Builds .gpu/, what the GPU check (benchmarks/gpu_check_comfyui.py) carries to a borrowed GPU machine that has torch,
torchaudio and numpy but none of ComfyUI's or the pack's other requirements and no network; prints the sizes.

    python benchmarks/gpu_carry.py [--comfyui ../shared/comfyui/0.33.0]

.gpu/ (ignored by git) holds:
  whl/      cp312 manylinux x86_64 wheels, installed there with pip install --no-index --no-deps --target /tmp/site
  comfyui/  ComfyUI 0.33.0 without what a headless server on a GPU never reads (tests, API nodes, blueprints,
            example output, and the tokenizer files of ComfyUI's own text encoders: the pack brings its own)
  stubs/av  an import-only stand-in for PyAV (a 40 MB wheel of FFmpeg): 0.33.0's node API imports `av` at start,
            only video and audio nodes use it

What 0.33.0 needs to start and serve POST /prompt headless, found by starting it with imports blocked: SQLAlchemy
(main.py imports the asset seeder; without alembic the database stays off, with a warning), pydantic (the asset
routes), av (above), torchsde and comfy-kitchen (the samplers, the ops; the pure-Python wheel: its CUDA kernels are a
57 MB wheel the pack never calls), comfy-aimdo, torchaudio (there). It starts without the frontend, templates and docs
packages (--front-end-root on an empty folder), alembic, kornia, spandrel, pydantic-settings, simpleeval and blake3
(the nodes that import them are left out, with a warning). The pack adds transformers (5.23, its minimum, whose
huggingface-hub and tokenizers needs the machine's own versions meet), diffusers, gguf, and regex and
importlib-metadata in case the machine's are older than they ask.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARRY = os.path.join(ROOT, ".gpu")
LIMIT = 64 * 2**20  # the working tree and everything carried, together

WHEELS = [
    "transformers==5.23.0", "diffusers==0.42.1", "gguf==0.19.0", "importlib-metadata==10.2.0", "regex==2026.5.9",
    "comfy-aimdo==0.4.13", "comfy-kitchen==0.2.31", "torchsde==0.2.6", "trampoline==0.1.2", "SQLAlchemy==2.1.9",
    "pydantic==2.13.4", "pydantic-core==2.46.4", "annotated-types==0.7.0", "typing-inspection==0.4.2",
]
PURE = {"comfy-kitchen==0.2.31"}  # taken as the py3-none-any wheel
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
LEFT_OUT = ["tests", "tests-unit", "comfy_api_nodes", "blueprints", "script_examples", "output", "openapi.yaml",
            "comfy/sd1_tokenizer", "comfy/text_encoders/*_tokenizer", "comfy/text_encoders/*/tokenizer*.json",
            "*.md", "__pycache__"]
AV_STUB = '''"""Import-only stand-in for PyAV (carried by benchmarks/gpu_carry.py): ComfyUI imports av at start; using it fails."""


class _Missing:
    def __init__(self, *args, **kwargs):
        raise ImportError("PyAV is not installed (a stand-in for the headless GPU check)")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Missing
'''
AV_MODULES = ["av", "av/container", "av/subtitles", "av/subtitles/stream", "av/video", "av/video/reformatter",
              "av/audio", "av/audio/resampler", "av/error", "av/filter"]


def download_wheels(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
            "3.12", "--implementation", "cp", "-d", folder]
    for spec in WHEELS:
        platforms = ["--platform", "any"] if spec in PURE else [a for p in PLATFORMS for a in ("--platform", p)]
        subprocess.run(base + platforms + [spec], check=True)


def copy_comfyui(source: str, dest: str) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.md"), symlinks=True)
    for pattern in LEFT_OUT:
        for path in glob.glob(os.path.join(dest, pattern)):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for path, dirs, files in os.walk(dest):  # the snapshot is read-only; the copy must be removable
        os.chmod(path, 0o755)
        for f in files:
            os.chmod(os.path.join(path, f), 0o644)


def write_av_stub(stubs: str) -> None:
    for module in AV_MODULES:
        folder = os.path.join(stubs, module)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "__init__.py"), "w") as f:
            f.write(AV_STUB)


def size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(p, f)) for p, _, files in os.walk(path) for f in files
               if not os.path.islink(os.path.join(p, f)))


def tracked_size() -> int:
    """The working tree that travels: tracked files and untracked ones git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    return sum(os.path.getsize(os.path.join(ROOT, n)) for n in names if n and os.path.isfile(os.path.join(ROOT, n)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.path.join(ROOT, "..", "shared", "comfyui", "0.33.0"))
    args = parser.parse_args(argv)
    shutil.rmtree(CARRY, ignore_errors=True)
    download_wheels(os.path.join(CARRY, "whl"))
    copy_comfyui(args.comfyui, os.path.join(CARRY, "comfyui"))
    write_av_stub(os.path.join(CARRY, "stubs"))
    mb = lambda n: f"{n / 2**20:7.2f} MiB"  # noqa: E731
    wheels = sorted(os.listdir(os.path.join(CARRY, "whl")))
    for w in wheels:
        print(f"  {mb(size(os.path.join(CARRY, 'whl', w)))}  whl/{w}")
    parts = {"wheels (.gpu/whl)": size(os.path.join(CARRY, "whl")),
             "ComfyUI 0.33.0, lean (.gpu/comfyui)": size(os.path.join(CARRY, "comfyui")),
             "av stand-in (.gpu/stubs)": size(os.path.join(CARRY, "stubs")),
             "working tree (tracked + untracked, not ignored)": tracked_size()}
    for name, n in parts.items():
        print(f"{mb(n)}  {name}")
    total = sum(parts.values())
    print(f"{mb(total)}  total, of {mb(LIMIT)} allowed")
    return 0 if total <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
