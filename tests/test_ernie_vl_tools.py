"""ERNIE-VL Think with Images: the tool-call parser on the reference parsers' cases, the zoom box, the prompt of a
conversation with tools against the chat template itself, the loop on the tiny Thinking model (scripted to call
the zoom tool by a logits processor) against transformers' generate(), and the loop through a stand-in server
that answers as vLLM's ernie45 tool parser does."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
from http.server import ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import ernie_vl as tiny
from fixtures.standin_servers import JsonHandler

from letterpress.loaders.errors import Interrupted, LetterpressError
from letterpress.loaders.handle import ModelHandle
from letterpress.nodes import NODE_CLASS_MAPPINGS as N
from letterpress.samplers import ernie_vl_tools as T

THINKING = "ERNIE-4.5-VL-28B-A3B-Thinking"
QUESTION = "what is the red sign"
CALL = {"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [100, 200, 600, 800]}}
# The tool-call text the scripted model emits, one tiny-tokenizer word per piece (json.dumps spacing).
CALL_WORDS = json.dumps(CALL).split()
RENAMED = {f"w{300 + k}": w for k, w in enumerate(["<tool_call>", "</tool_call>"] + CALL_WORDS)}
REAL_TEMPLATE = os.path.join(os.path.dirname(__file__), "fixtures", "ernie_vl_thinking_chat_template.jinja")


def node(name):
    return N["LetterpressErnieVL" + name]()


def picture(seed=11, size=(80, 64)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def as_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32)[None] / 255.0)


# the parser: cases of the reference parsers' own tests, as data --------------------------------------------
# vLLM tests/tool_parsers/test_ernie45_moe_tool_parser.py (test_extract_tool_calls, ..._no_tools)
TEMP = {"name": "get_current_temperature", "arguments": {"location": "Beijing"}}
UNIT = {"name": "get_temperature_unit", "arguments": {"location": "Guangzhou", "unit": "c"}}
VLLM_CASES = [
    ("This is a test", []),
    ('<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "Beijing"}}\n</tool_call>\n', [TEMP]),
    ('<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "Beijing"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_temperature_unit", "arguments": {"location": "Guangzhou", "unit": "c"}}\n'
     '</tool_call>\n', [TEMP, UNIT]),
    ('I need to call two tools to handle these two issues separately.\n</think>\n\n<tool_call>\n{"name": '
     '"get_current_temperature", "arguments": {"location": "Beijing"}}\n</tool_call>\n<tool_call>\n{"name": '
     '"get_temperature_unit", "arguments": {"location": "Guangzhou", "unit": "c"}}\n</tool_call>\n', [TEMP, UNIT]),
]
# FastDeploy tests/entrypoints/openai/tool_parsers/test_ernie_45_vl_thinking_tool_parser.py (batch extraction):
# complete call; arguments cut off, and JSON without its braces, are no call; words between </think> and the call
# are no call.
WEATHER = {"name": "get_weather", "arguments": {"location": "北京"}}
FASTDEPLOY_CASES = [
    ('<tool_call>{"name": "get_weather", "arguments": {"location": "北京"}}</tool_call>', [WEATHER]),
    ('<tool_call>{"name": "get_weather", "arguments": {"location": "北"</tool_call>', []),
    ("no tool call here", []),
    ('<tool_call>"name": "get_weather", "arguments": {</tool_call>', []),
    ('</think>abc<tool_call>{"name": "get_weather", "arguments": {"location": "北京"}}</tool_call>', []),
    ('</think>\n\n<tool_call>{"name": "get_weather", "arguments": {"location": "北京"}}</tool_call>', [WEATHER]),
]


@pytest.mark.parametrize("text,calls", VLLM_CASES + FASTDEPLOY_CASES)
def test_parser_on_the_reference_parsers_cases(text, calls):
    answer, found = T.parse_tool_calls(text)
    assert found == calls
    if not calls:
        assert answer == text.strip()  # no call: the whole output is the answer


def test_a_turn_splits_into_reasoning_answer_and_calls():
    assert T.split_turn('look closer </think>\n<tool_call>\n' + json.dumps(CALL) + '\n</tool_call>') == \
        ("look closer", "", [CALL])
    assert T.split_turn("still thinking <tool_call>") == ("still thinking <tool_call>", "", [])  # never closed
    assert T.split_turn("done </think> A red sign.") == ("done", "A red sign.", [])
    # a last block whose closing tag was cut off but whose JSON is whole still counts (FastDeploy)
    assert T.split_turn("x </think><tool_call>" + json.dumps(CALL)) == ("x", "", [CALL])


# the zoom box -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bbox,box", [
    ([100, 200, 600, 800], [8, 12, 48, 52]),        # 80x64: x 8..48, y 12.8..51.2 covered
    ([600, 800, 100, 200], [8, 12, 48, 52]),        # reversed corners
    ([-50, 900, 1200, 1100], [0, 36, 80, 64]),      # clamped: y 57.6 -> grown to 28 px inside the picture
    ([500, 500, 510, 510], [27, 19, 55, 47]),       # tiny (x 40..41): 28 px, 13 before and 14 after
    ([0, 0, 5, 5], [0, 0, 28, 28]),                 # tiny at the corner: grown inward
])
def test_zoom_box(bbox, box):
    assert T.zoom_box(bbox, 80, 64) == box


def test_zoom_box_refuses_what_is_no_box():
    for bad in ([1, 2, 3], "0 0 10 10", [0, 0, float("nan"), 5], [0, 0, True, 5]):
        with pytest.raises(LetterpressError, match="bbox_2d"):
            T.zoom_box(bad, 80, 64)


# the tiny Thinking model with a tool-call vocabulary ---------------------------------------------------------
@pytest.fixture(scope="module")
def thinking(ernie_vl):
    from letterpress.loaders.ernie_vl import _processor_class

    handle = node("Loader").run(THINKING, "fp32")[0]
    old = handle.processor
    tok = tiny.tokenizer(RENAMED)
    assert len(tok) == len(old.tokenizer)
    processor = _processor_class()(old.image_processor, tok, chat_template=tiny.THINKING_CHAT_TEMPLATE)
    return ModelHandle(family=handle.family, role=handle.role, module=handle.module, tokenizer=tok,
                       processor=processor)


class Forced(torch.nn.Module):
    """The real model; its first generate() call is forced to emit `script` (a logits processor), later calls run
    free. Keeps every call's input ids, pixels and output."""

    def __init__(self, model, script):
        super().__init__()
        self.model, self.script, self.calls = model, script, []

    @property
    def device(self):
        return self.model.device

    @property
    def generation_config(self):
        return self.model.generation_config

    def generate(self, **kw):
        if not self.calls:
            from transformers import LogitsProcessorList

            start = kw["input_ids"].shape[1]
            script = self.script

            def force(input_ids, scores):
                k = input_ids.shape[1] - start
                out = torch.full_like(scores, -float("inf"))
                out[:, script[min(k, len(script) - 1)]] = 0
                return out

            kw["logits_processor"] = LogitsProcessorList([force])
        out = self.model.generate(**kw)
        self.calls.append({"input_ids": kw["input_ids"], "pixel_values": kw["pixel_values"],
                           "new": out[0, kw["input_ids"].shape[1]:].tolist()})
        return out


def forced(handle, words):
    tok = handle.processor.tokenizer
    ids = tok.convert_tokens_to_ids(words.split())
    assert tok.unk_token_id not in ids
    module = Forced(handle.module, ids)
    return ModelHandle(family=handle.family, role=handle.role, module=module, tokenizer=tok, processor=handle.processor), module


SCRIPT = "w5 w6 </think> <tool_call> " + " ".join(CALL_WORDS) + " </tool_call> <|end_of_sentence|>"


def reference_inputs(handle, msgs, images):
    """Prompt ids and pixels built here from transformers' pieces: the tokenizer's chat template, the image
    processor, the image tokens expanded by the merged patch count."""
    from transformers import Ernie4_5_VLMoeImageProcessorPil

    tok = handle.processor.tokenizer
    text = tok.apply_chat_template(msgs, tools=[T.ZOOM_TOOL], chat_template=tiny.THINKING_CHAT_TEMPLATE,
                                   tokenize=False, add_generation_prompt=True, enable_thinking=True)
    improc = Ernie4_5_VLMoeImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112},
                                             patch_size=14, merge_size=2)
    pix = improc(images, return_tensors="pt")
    merged = (pix["image_grid_thw"].prod(-1) // 4).tolist()
    parts = text.split(tok.image_token)
    assert len(parts) == len(images) + 1
    text = parts[0] + "".join(tok.image_token * m + p for m, p in zip(merged, parts[1:]))
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    return ids, pix


def reference_generate(handle, ids, pix, tokens):
    tok = handle.processor.tokenizer
    mm = torch.isin(ids, torch.tensor([tok.image_token_id])).long()
    moe = torch.isin(ids, torch.tensor([tok.image_token_id, tok.image_start_token_id, tok.image_end_token_id])).long()
    model = handle.module.model if isinstance(handle.module, Forced) else handle.module
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix["pixel_values"],
                             image_grid_thw=pix["image_grid_thw"], mm_token_type_ids=mm, moe_mm_token_type_ids=moe,
                             max_new_tokens=tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def conversation_after_zoom(reasoning="w5 w6"):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": "", "reasoning_content": reasoning,
             "tool_calls": [{"type": "function", "function": CALL}]},
            {"role": "tool", "content": [{"type": "image"}]}]


def test_the_prompt_with_tools_is_the_templates(thinking):
    """The pack's prompt for a conversation with the tool list, a call and its result (the crop) is the chat
    template's, token for token, with the crop's pixels where the template puts its picture."""
    img, crop = picture(), picture(12, (40, 40))
    msgs = conversation_after_zoom()
    ids, pix = reference_inputs(thinking, msgs, [img, crop])
    prompt = T.render(thinking.processor, msgs, [T.ZOOM_TOOL])
    ours = thinking.processor(text=[prompt], images=[img, crop], return_tensors="pt")
    assert ours["input_ids"].tolist() == ids.tolist()
    assert torch.equal(ours["pixel_values"], pix["pixel_values"])
    words = thinking.processor.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    assert "<tool_output>" in " ".join(words) or words.count("<|IMAGE_START|>") == 2


@pytest.mark.skipif(not os.path.exists(REAL_TEMPLATE), reason=(
    "the chat template of baidu/ERNIE-4.5-VL-28B-A3B-Thinking (tokenizer_config.json) is not in tests/fixtures: it "
    "could not be fetched here (no hub access)"))
def test_the_prompt_with_tools_is_the_real_templates(thinking):
    from letterpress.loaders.ernie_vl import _processor_class

    with open(REAL_TEMPLATE, encoding="utf-8") as f:
        real = f.read()
    old = thinking.processor
    processor = _processor_class()(old.image_processor, old.tokenizer, chat_template=real)
    msgs = conversation_after_zoom()
    expected = old.tokenizer.apply_chat_template(msgs, tools=[T.ZOOM_TOOL], chat_template=real, tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=True)
    expected = expected.replace("<|image@placeholder|>", old.tokenizer.image_token)
    assert processor.tokenizer(T.render(processor, msgs, [T.ZOOM_TOOL])).input_ids == \
        processor.tokenizer(expected).input_ids


def test_a_template_without_tool_calling_is_refused(thinking):
    from letterpress.loaders.ernie_vl import _processor_class

    old = thinking.processor
    plain = _processor_class()(old.image_processor, old.tokenizer, chat_template=tiny.CHAT_TEMPLATE)
    with pytest.raises(LetterpressError, match="no tool calling"):
        T.render(plain, conversation_after_zoom(), [T.ZOOM_TOOL])


def test_the_loop_zooms_and_the_second_turn_is_transformers_generate(thinking):
    handle, module = forced(thinking, SCRIPT)
    img = picture()
    answer, reasoning, calls, crops = node("ThinkWithImages").run(
        handle, as_tensor(img), QUESTION, "", 2, 12, 0.0, 0.8, 0)
    # the crop: 0-1000 -> pixels of the 80x64 picture, exactly these pixels
    expected = np.asarray(img)[12:52, 8:48]
    assert crops.shape == (1, 40, 40, 3)
    assert np.array_equal((crops[0].numpy() * 255).round().astype(np.uint8), expected)
    found = json.loads(calls)["calls"]
    assert found[0]["name"] == CALL["name"] and found[0]["arguments"] == CALL["arguments"]
    assert found[0]["box"] == [8, 12, 48, 52]
    assert "w5 w6" in reasoning and "image_zoom_in_tool" in reasoning
    # the second turn: the conversation with the crop, as the template lays it out, and the same tokens as
    # transformers' generate() on it
    ids, pix = reference_inputs(thinking, conversation_after_zoom(), [img, Image.fromarray(expected)])
    second = module.calls[1]
    assert second["input_ids"].tolist() == ids.tolist()
    assert torch.equal(second["pixel_values"], pix["pixel_values"])
    ref = reference_generate(handle, ids, pix, 12)
    assert second["new"] == ref
    tok = thinking.processor.tokenizer
    assert len(set(ref) - {tok.eos_token_id}) >= 3, "the free turn must say something to compare"
    assert len(module.calls) == 2  # the free turn called nothing: the loop ended there
    free = " ".join(tok.convert_ids_to_tokens([i for i in ref if i != tok.eos_token_id]))
    assert free in reasoning or free.split("</think>")[-1].strip() == answer


def test_max_tool_calls_and_progress_and_cancel(thinking, host):
    img = as_tensor(picture())
    handle, module = forced(thinking, SCRIPT)
    answer, reasoning, calls, crops = node("ThinkWithImages").run(handle, img, QUESTION, "", 0, 30, 0.0, 0.8, 0)
    assert len(module.calls) == 1 and torch.equal(crops, img)  # no zoom: the picture itself
    assert json.loads(calls)["calls"][0]["error"] == "not run: max_tool_calls reached"

    ticks = []
    host.progress_listeners.append(lambda done, total: ticks.append((done, total)))
    handle, module = forced(thinking, SCRIPT)
    node("ThinkWithImages").run(handle, img, QUESTION, "", 1, 30, 0.0, 0.8, 0)
    first = len(SCRIPT.split())
    assert ticks[first - 1] == (first, 30)  # one tick per token of the first turn
    ticks.clear()
    host.progress_listeners.append(lambda done, total: host.request_interrupt() if done == 3 else None)
    handle, module = forced(thinking, SCRIPT)
    with pytest.raises(Interrupted):
        node("ThinkWithImages").run(handle, img, QUESTION, "", 1, 30, 0.0, 0.8, 0)
    assert len(ticks) == 3 and len(module.calls) == 0


# the remote loop against a stand-in answering as vLLM's ernie45 tool parser ----------------------------------
class VllmErnie45(JsonHandler):
    """vLLM with --reasoning-parser ernie45 --tool-call-parser ernie45 --enable-auto-tool-choice, as its parser
    answers: the reasoning in reasoning_content; a turn that calls tools streams the content before
    <tool_call> (none here) and one tool_calls delta per complete call (id, function name, arguments as JSON text),
    finish_reason "tool_calls". A request that already holds a tool result is answered in words."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        called = any(m["role"] == "tool" for m in body["messages"])
        if called:
            events = [{"delta": {"reasoning_content": "the crop shows it"}}, {"delta": {"content": "A red sign."}},
                      {"delta": {}, "finish_reason": "stop"}]
        else:
            events = [{"delta": {"reasoning_content": "look closer"}},
                      {"delta": {"tool_calls": [{"index": 0, "id": "chatcmpl-tool-1", "type": "function",
                                                 "function": {"name": CALL["name"],
                                                              "arguments": json.dumps(CALL["arguments"])}}]}},
                      {"delta": {}, "finish_reason": "tool_calls"}]
        if not body["stream"]:
            msg = {"role": "assistant", "content": "".join(e["delta"].get("content", "") for e in events) or None,
                   "reasoning_content": events[0]["delta"]["reasoning_content"]}
            if not called:
                msg["tool_calls"] = events[1]["delta"]["tool_calls"]
            return self._json(200, {"choices": [{"index": 0, "message": msg}], "usage": {"completion_tokens": 5}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for e in events:
            self.wfile.write(f"data: {json.dumps({'choices': [{'index': 0, **e}]})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture()
def vllm():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), VllmErnie45)
    srv.daemon_threads, srv.requests = True, []
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("stream", [True, False])
def test_remote_loop_against_vllm_ernie45(vllm, stream):
    img = picture()
    answer, reasoning, calls, crops = node("RemoteThinkWithImages").run(
        f"http://127.0.0.1:{vllm.server_address[1]}/v1", "baidu/ERNIE-4.5-VL-28B-A3B-Thinking", "", as_tensor(img),
        QUESTION, "", 3, 64, 0.0, 0.8, 0, stream, 10.0)
    assert answer == "A red sign."
    assert "look closer" in reasoning and "the crop shows it" in reasoning
    first, second = vllm.requests
    assert first["tools"][0]["function"]["name"] == "image_zoom_in_tool" and first["tool_choice"] == "auto"
    call_msg, tool_msg = second["messages"][-2:]
    assert call_msg["role"] == "assistant" and call_msg["tool_calls"][0]["id"] == "chatcmpl-tool-1"
    assert json.loads(call_msg["tool_calls"][0]["function"]["arguments"]) == CALL["arguments"]
    assert tool_msg["role"] == "tool" and tool_msg["tool_call_id"] == "chatcmpl-tool-1"
    url = tool_msg["content"][0]["image_url"]["url"]
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    assert np.array_equal(sent, np.asarray(img)[12:52, 8:48])
    assert np.array_equal((crops[0].numpy() * 255).round().astype(np.uint8), sent)
    assert json.loads(calls)["calls"][0]["box"] == [8, 12, 48, 52]
    assert [b["box"] for b in json.loads(calls)["boxes"]] == [[8, 12, 48, 52]]  # what Draw Boxes reads


class NoParsers(JsonHandler):
    """A server started without a reasoning or tool-call parser (vLLM's default): the model's text as it wrote it,
    the reasoning closed by </think> and the call as a <tool_call> block in the content, no tool_calls field."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if any(m["role"] == "tool" for m in body["messages"]):
            text = "the crop shows it</think>\nA red sign."
        else:
            text = f"look closer</think>\n<tool_call>\n{json.dumps(CALL)}\n</tool_call>"
        self._json(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})


def test_remote_loop_reads_the_calls_from_the_text_without_a_tool_parser():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), NoParsers)
    srv.daemon_threads, srv.requests = True, []
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        img = picture()
        answer, reasoning, calls, crops = node("RemoteThinkWithImages").run(
            f"http://127.0.0.1:{srv.server_address[1]}/v1", "m", "", as_tensor(img), QUESTION, "", 3, 64, 0.0, 0.8,
            0, False, 10.0)
    finally:
        srv.shutdown()
        srv.server_close()
    assert answer == "A red sign."
    assert "look closer" in reasoning and "the crop shows it" in reasoning and "<tool_call>" not in reasoning
    call_msg, tool_msg = srv.requests[1]["messages"][-2:]
    assert json.loads(call_msg["tool_calls"][0]["function"]["arguments"]) == CALL["arguments"]
    assert tool_msg["tool_call_id"] == call_msg["tool_calls"][0]["id"]
    assert json.loads(calls)["calls"][0]["box"] == [8, 12, 48, 52]


# grounding in the Thinking model's plain numbers --------------------------------------------------------------
@pytest.mark.parametrize("answer", [
    "The red sign is at [100, 200, 600, 800].",
    '```json\n[{"label": "red sign", "bbox_2d": [100, 200, 600, 800]}]\n```',
    "red sign <|LOC_BEGIN|><|LOC_100|><|LOC_200|><|LOC_600|><|LOC_800|><|LOC_END|>",
])
def test_parse_boxes_reads_plain_numbers_and_loc_tokens(answer):
    out = json.loads(node("ParseBoxes").run(answer, as_tensor(picture()), "red sign")[0])
    assert [b["box"] for b in out["boxes"]] == [[8.0, 12.8, 48.0, 51.2]]
    assert "red sign" in out["boxes"][0]["label"]
