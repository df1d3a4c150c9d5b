"""Remote Generate against a real OpenAI-compatible server: `transformers serve` (transformers' own, its `serving`
extra) serving the tiny ERNIE-4.5-VL on CPU, pinned to that model. Its answers equal local Generate's token for
token except the special tokens, which this server always decodes away (it refuses `skip_special_tokens` as an
unknown field, 422; the node then asks again without it): streamed and not, thinking on and off. Cancel mid-stream
stops the request and the server serves the next; a wrong model name (the server answers 400 with the pinned name)
is a clear error; Parse Boxes says why an answer from such a server has no boxes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

from letterpress.loaders.errors import Interrupted, LetterpressError
from letterpress.nodes import NODE_CLASS_MAPPINGS as N

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn", "openai")),
    reason="transformers serve needs its serving extra: pip install 'transformers[serving]'")
PROMPT = "what is this?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ernie_vl, tmp_path_factory):
    """The tiny model's folder served by `transformers serve` on a free port; (base URL, model name)."""
    from transformers.models.ernie4_5_vl_moe.video_processing_ernie4_5_vl_moe import Ernie4_5_VLMoeVideoProcessor

    folder = str(tmp_path_factory.mktemp("served") / "ERNIE-4.5-VL")
    shutil.copytree(ernie_vl["folder"], folder)
    # The server loads the whole processor, video part included: its config as the release ships one (the video
    # processor's defaults; no frame-number font, which would be downloaded).
    Ernie4_5_VLMoeVideoProcessor(patch_size=14, merge_size=2, draw_on_frames=False).save_pretrained(folder)
    port = _free_port()
    log = open(os.path.join(folder, "..", "serve.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", folder, "--host",
                             "127.0.0.1", "--port", str(port), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # bounds a hang only
    try:
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=10).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("transformers serve did not start:\n" + open(log.name).read()[-3000:])
                time.sleep(0.2)
        yield base + "/v1", folder
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def image():
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 56, 56, 3)).astype(np.float32) / 255)


@pytest.fixture(scope="module")
def local(ernie_vl, session_host):
    return N["LetterpressErnieVLLoader"]().run("ERNIE-4.5-VL-28B-A3B-PT", "auto")[0]


def without_special(text: str, tokenizer) -> str:
    for token in sorted(tokenizer.all_special_tokens, key=len, reverse=True):
        text = text.replace(token, " ")
    return " ".join(text.split())


def remote(served, image, thinking=False, stream=True, model=None, tokens=12):
    url, name = served
    return N["LetterpressErnieVLRemoteGenerate"]().run(url, model or name, "", image, "free question", PROMPT, "",
                                                        thinking, tokens, 0.0, 1.0, 0, stream, 120.0)


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_the_servers_answer_is_local_generates_without_special_tokens(served, image, local, ernie_vl, thinking, stream):
    answer, reasoning = N["LetterpressErnieVLGenerate"]().run(local, image, "free question", PROMPT, "", thinking, 12,
                                                              0.0, 1.0, 0)
    r_answer, r_reasoning = remote(served, image, thinking, stream)
    tok = ernie_vl["tokenizer"]
    here = without_special(reasoning + " " + answer, tok)
    assert here and without_special(r_reasoning + " " + r_answer, tok) == here
    # the local answer has special tokens (ERNIE's grounding coordinates among them); the server's has none
    assert any(t in reasoning + answer for t in tok.all_special_tokens)
    assert not any(t in r_reasoning + r_answer for t in tok.all_special_tokens)


def test_parse_boxes_says_the_server_dropped_the_coordinates(served, image):
    answer, _ = remote(served, image, tokens=12)
    boxes = json.loads(N["LetterpressErnieVLParseBoxes"]().run(answer, image, "")[0])
    assert boxes["boxes"] == [] and "skip_special_tokens" in boxes["note"]


def test_cancel_mid_stream_stops_and_the_server_serves_the_next(served, image, host):
    seen = []
    host.progress_listeners.append(lambda done, total: (seen.append(done), host.request_interrupt() if done == 2 else None))
    with pytest.raises(Interrupted):
        remote(served, image, tokens=200)
    assert max(seen) <= 3
    host.progress_listeners.clear()
    assert remote(served, image, tokens=4)[0]


def test_a_wrong_model_name_is_a_clear_error(served, image):
    with pytest.raises(LetterpressError, match=r"HTTP 400: .*pinned to .*ERNIE-4.5-VL.*requested 'nobody/model'"):
        remote(served, image, model="nobody/model")
