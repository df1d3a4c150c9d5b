"""ERNIE-VL Generate through an OpenAI-compatible chat-completions server (vLLM, SGLang and FastDeploy serve
ERNIE-4.5-VL this way): the request body and the answer split into answer and reasoning.

Images travel as base64 PNG data URLs in the user message, before the text, as the local node orders them; a video
clip after them as vLLM's frame-list video (samplers/ernie_vl_video.py). Thinking is switched with
`chat_template_kwargs: {"enable_thinking": ...}`, which these servers pass to the model's chat template. The request
keeps special tokens (remote_openai.KEEP_SPECIAL_TOKENS), which carry the grounding coordinates (`<|LOC_n|>`); a
server that refuses those fields answers without them (Parse Boxes says so when it finds no boxes). Without a
reasoning parser on the server, a `</think>` in the content is split here.
"""

from __future__ import annotations

from ..loaders.errors import LetterpressError
from .ernie_vl import THINK_CLOSE, THINK_OPEN, messages
from .ernie_vl_video import video_part
from .generate import check_request, sampling_args
from .images import to_pil
from .remote_openai import KEEP_SPECIAL_TOKENS, chat, chat_url, image_data_url


def build_request(model: str, images, text: str, system_prompt: str, thinking: bool, max_new_tokens: int,
                  temperature: float, top_p: float, seed: int, stream: bool, video=None) -> dict:
    """The request body; `images` None sends none, `video` (samplers/ernie_vl_video.Clip) goes after them as
    samplers/ernie_vl_video.video_part writes it."""
    check_request(max_new_tokens, seed)
    sampling = sampling_args(temperature, top_p)  # the same checks and greedy rule as local generation
    msgs = messages(0, text, system_prompt)
    user = msgs[-1]
    pictures = [] if images is None else to_pil(images)
    user["content"] = [{"type": "image_url", "image_url": {"url": image_data_url(p)}} for p in pictures]
    if video is not None:
        user["content"].append(video_part(video))
    user["content"].append({"type": "text", "text": text})
    body = {"model": model, "messages": msgs, "max_tokens": int(max_new_tokens), "stream": bool(stream),
            "seed": int(seed) & 0x7FFFFFFFFFFFFFFF, "chat_template_kwargs": {"enable_thinking": bool(thinking)}}
    body.update(KEEP_SPECIAL_TOKENS)
    if sampling["do_sample"]:
        body["temperature"] = float(temperature)
        body["top_p"] = float(top_p)
    else:
        body["temperature"] = 0.0  # greedy
    return body


def split_text(content: str, reasoning: str, thinking: bool) -> tuple[str, str]:
    if not reasoning and THINK_CLOSE in content:
        reasoning, content = content.split(THINK_CLOSE, 1)
        reasoning = reasoning.replace(THINK_OPEN, "")
    elif not reasoning and thinking and THINK_OPEN in content:
        return "", content.replace(THINK_OPEN, "").strip()  # the reasoning never closed
    return content.strip(), reasoning.strip()


def remote_generate(base_url: str, model: str, api_key: str, images, text: str, system_prompt: str, thinking: bool,
                    max_new_tokens: int, temperature: float, top_p: float, seed: int, stream: bool,
                    timeout: float, video=None) -> tuple[str, str]:
    """(answer, reasoning) from the server; `video` a samplers/ernie_vl_video.Clip or None."""
    url = chat_url(base_url)
    model = check_model(model)
    body = build_request(model, images, text, system_prompt, thinking, max_new_tokens, temperature, top_p,
                         seed, stream, video)
    content, reasoning, _ = chat(url, body, model, api_key, timeout, max_new_tokens)
    return split_text(content, reasoning, thinking)


def check_model(model: str) -> str:
    if not model.strip():
        raise LetterpressError("The model name is empty: give the name the server serves (e.g. baidu/ERNIE-4.5-VL-28B-A3B-PT).")
    return model.strip()
