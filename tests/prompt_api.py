"""A ComfyUI server in a subprocess and a small client for its HTTP API (POST /prompt, /history, /view, /free) and its
websocket (`watch`), shared by the tests that run the pack inside ComfyUI (test_comfyui.py) and the GPU check
(benchmarks/gpu_check_comfyui.py). It talks to ComfyUI over HTTP only, never imports it.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Comfy:
    def __init__(self, port: int, log_path=None):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc = None  # the server's process, when start() started it

    def log(self) -> str:
        return open(self.log_path, errors="replace").read()

    def get(self, path):
        return json.load(urllib.request.urlopen(self.url + path, timeout=30))

    def post(self, path, body=None):
        req = urllib.request.Request(self.url + path, json.dumps(body or {}).encode(), {"Content-Type": "application/json"})
        data = urllib.request.urlopen(req, timeout=30).read()
        return json.loads(data) if data.strip() else None

    def queue(self, wf) -> str:
        try:
            return self.post("/prompt", {"prompt": wf, "client_id": str(uuid.uuid4())})["prompt_id"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"ComfyUI refused the prompt: {e.read().decode()[:2000]}")

    def wait(self, pid, timeout=600) -> dict:
        """The history entry of a finished prompt (polled; the timeout only bounds a hang)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            h = self.get(f"/history/{pid}")
            if pid in h:
                return h[pid]
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited (code {self.proc.returncode}) while running prompt {pid}")
            time.sleep(0.3)
        raise TimeoutError(pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def view_image(comfy: Comfy, entry: dict, node_id: str):
    """The first image a SaveImage node wrote, as /view serves it: an int array (H, W, C) of 0..255."""
    import numpy as np
    from PIL import Image

    info = entry["outputs"][node_id]["images"][0]
    data = urllib.request.urlopen(f"{comfy.url}/view?filename={info['filename']}&subfolder={info['subfolder']}"
                                  f"&type={info['type']}").read()
    return np.asarray(Image.open(io.BytesIO(data))).astype(int)


class StartError(RuntimeError):
    pass


def start(comfyui: str, base: str, args: list[str] = (), timeout: float = 600, env: dict | None = None) -> Comfy:
    """ComfyUI's main.py from the tree `comfyui` on a free port with --base-directory `base` (its log in
    base/comfyui.log), once it answers /system_stats. Raises StartError with the log's end if it exits first."""
    port = free_port()
    log_path = os.path.join(base, "comfyui.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port),
                                 "--base-directory", base, "--disable-auto-launch", *args],
                                cwd=comfyui, stdout=log, stderr=subprocess.STDOUT, env=env)
    c = Comfy(port, log_path)
    c.proc = proc
    deadline = time.monotonic() + timeout  # bounds a hang only
    while True:
        try:
            c.get("/system_stats")
            return c
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.monotonic() > deadline:
                c.stop()
                tail = "".join(open(log_path, errors="replace").readlines()[-15:])
                raise StartError(f"ComfyUI at {comfyui} did not start (are its requirements installed?):\n{tail}")
            time.sleep(0.5)


def watch(comfy: Comfy, wf: dict, timeout: float = 120) -> tuple[list, list]:
    """Queue `wf` with a websocket open, as the editor does; its JSON events (each with the perf_counter time it
    arrived, as "received") and binary messages (type, payload) until the prompt ends. `timeout`: the longest wait
    for one message (bounds a hang only)."""
    import asyncio
    import struct

    import aiohttp

    async def run():
        client = str(uuid.uuid4())
        events, binary = [], []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{comfy.url}/ws?clientId={client}") as ws:
                await asyncio.to_thread(comfy.post, "/prompt", {"prompt": wf, "client_id": client})
                while True:
                    msg = await asyncio.wait_for(ws.receive(), timeout=timeout)
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        binary.append((struct.unpack(">I", msg.data[:4])[0], msg.data[4:]))
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        event = {**json.loads(msg.data), "received": time.perf_counter()}
                        events.append(event)
                        if event["type"] in ("execution_success", "execution_error", "execution_interrupted") or (
                                event["type"] == "executing" and event["data"].get("node") is None):
                            return events, binary
                    else:
                        raise AssertionError(f"websocket closed: {msg}")

    return asyncio.run(run())
