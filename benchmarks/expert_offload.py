"""ERNIE-4.5-VL's routed experts in CPU memory (loaders/ernie_vl_experts.py): on a mid-size synthetic ERNIE-4.5-VL text
model (random weights, 64 experts of which 6 run per token, as the real one), generated tokens per second with the
experts in the model and in CPU memory (interleaved runs, medians; on this CPU both compute on the CPU, so the ratio
is the cost of the expert loop itself), whether the tokens are the same, and the bytes that would cross between CPU
memory and a GPU per token (counted as if the compute device were one: prefill and decode apart), beside what
streaming whole expert banks would move. The last lines give the same figures computed for the real model.

    python benchmarks/ernie_vl_experts.py [--runs 5] [--tokens 32] [--prompt 64] [--gpu-min-tokens 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from letterpress.loaders import ernie_vl_experts
from letterpress.loaders.ernie_vl_experts import OffloadedExperts

REAL = dict(hidden=2560, intermediate=1536, experts=64, routed=6, layers=28, bytes=2)  # text experts, bf16


def model(hidden: int, layers: int, intermediate: int):
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    torch.manual_seed(0)
    cfg = Ernie4_5_VLMoeConfig(text_config=dict(
        vocab_size=1024, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 128, num_key_value_heads=2, moe_num_experts=64, moe_k=REAL["routed"],
        moe_intermediate_size=[intermediate, intermediate // 3], moe_num_shared_experts=2,
        mlp_layer_types=["sparse"] * layers), vision_config=dict(depth=1, hidden_size=128, intermediate_size=256,
                                                                num_heads=2))
    m = Ernie4_5_VLMoeForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    return m


def generate(m, ids, tokens: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--gpu-min-tokens", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(2)

    inside = model(args.hidden, args.layers, args.intermediate)
    offloaded = model(args.hidden, args.layers, args.intermediate)
    banks = ernie_vl_experts.offload_experts(offloaded, args.gpu_min_tokens)
    OffloadedExperts.separate = staticmethod(lambda device: True)  # count what would cross to a GPU
    ids = torch.randint(0, 1024, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    times = {"in the model": [], "in CPU memory": []}
    same = True
    for _ in range(args.runs):
        a, t_in = generate(inside, ids, args.tokens)
        for bank in banks:
            bank.traffic = ernie_vl_experts.Traffic()
        b, t_off = generate(offloaded, ids, args.tokens)
        times["in the model"].append(args.tokens / t_in)
        times["in CPU memory"].append(args.tokens / t_off)
        same = same and torch.equal(a, b)
    traffic = ernie_vl_experts.traffic(offloaded)

    # prefill alone (one forward over the prompt), for its share of the traffic
    for bank in banks:
        bank.traffic = ernie_vl_experts.Traffic()
    with torch.no_grad():
        offloaded(input_ids=ids)
    prefill = ernie_vl_experts.traffic(offloaded)
    decode_bytes = traffic.token_bytes + traffic.weight_bytes - prefill.token_bytes - prefill.weight_bytes
    bank_bytes = ernie_vl_experts.bank_bytes(offloaded)
    text_bank = sum(b.weight_bytes() for b in banks[0::2])  # text and vision banks alternate; text tokens use text

    print(f"synthetic ERNIE-4.5-VL text model: hidden {args.hidden}, {args.layers} layers, 64 experts "
          f"(intermediate {args.intermediate}), {REAL['routed']} routed per token; prompt {args.prompt}, "
          f"{args.tokens} new tokens, {args.runs} runs, CPU, torch {torch.__version__}")
    for label, values in times.items():
        print(f"  experts {label:<14} {statistics.median(values):7.2f} tokens/s (median)")
    print(f"  same tokens: {same}; experts kept off the device: {bank_bytes / 2**20:.1f} MiB of "
          f"{(bank_bytes + sum(p.numel() * p.element_size() for p in offloaded.parameters())) / 2**20:.1f} MiB")
    print(f"  crossing per prompt token (prefill): {(prefill.token_bytes + prefill.weight_bytes) / args.prompt / 1024:.1f}"
          f" KiB ({prefill.experts_on_device} expert calls moved weights, {prefill.experts_on_cpu} moved tokens)")
    print(f"  crossing per generated token (decode): {decode_bytes / args.tokens / 1024:.1f} KiB; streaming the text "
          f"banks instead: {text_bank / 1024:.1f} KiB")
    r = REAL
    expert = 3 * r["hidden"] * r["intermediate"] * r["bytes"]
    token = r["routed"] * r["layers"] * 2 * r["hidden"] * r["bytes"]
    print(f"real ERNIE-4.5-VL-28B-A3B (computed): one text expert {expert / 2**20:.1f} MiB, a text bank "
          f"{r['experts'] * expert / 2**30:.2f} GiB per layer; a decoded token moves {token / 2**20:.2f} MiB with the "
          f"experts in CPU memory, {r['layers'] * r['experts'] * expert / 2**30:.1f} GiB if the banks streamed")


if __name__ == "__main__":
    main()
