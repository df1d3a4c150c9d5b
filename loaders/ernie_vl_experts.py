"""ERNIE-4.5-VL's routed experts kept in CPU memory, the rest of the model on the compute device.

ERNIE-4.5-VL-28B-A3B holds 28B parameters, almost all of them in its routed experts (64 text and 64 vision experts
per layer), of which each token uses 6. A memory manager that streams layers would move a whole expert bank (1.5 GB
per layer in bf16) for every token; `OffloadedExperts` takes the place of transformers' expert bank and keeps its
weights out of the model's parameters (a plain attribute: no memory manager counts, moves or streams them; the
host, ComfyUI's included, places everything else as usual). For each expert a batch of tokens is routed to, it runs
where that is cheapest: the tokens go to the CPU and back (two rows of `hidden` values per token) when few are
routed to it, as in decoding; when at least `gpu_min_tokens` are, as in a prompt's prefill, that one expert's
weights are copied to the compute device instead. The arithmetic is transformers' eager expert loop (the same
products, activation, routing weights and index_add), so on one device it computes what the bank computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EXPERTS = "Ernie4_5_VLMoeMoeExperts"  # transformers' expert bank class (text and vision experts alike)


@dataclass
class Traffic:
    """What crossed between CPU memory and the compute device, for the benchmark and the tests."""

    tokens: int = 0  # token rows the experts computed (one per token and routed expert)
    token_bytes: int = 0  # hidden states sent to the CPU and results sent back
    weight_bytes: int = 0  # expert weights copied to the device
    experts_on_cpu: int = 0  # expert calls computed on the CPU
    experts_on_device: int = 0  # expert calls computed on the device (weights copied)

    def add(self, other: "Traffic") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class OffloadedExperts(torch.nn.Module):
    """Transformers' expert bank (gate_up_proj [E, 2I, H], down_proj [E, H, I]), its weights in CPU memory
    (`offload`, see the module docstring) or among the model's parameters, each bank stored as read or packed to a
    ggml type (`qtype`: loaders/quantize.py, the bytes gguf's quantizer writes; a bank whose rows are not whole
    blocks stays as read). A packed expert is dequantized where it is computed, after its bytes moved."""

    def __init__(self, bank: torch.nn.Module, gpu_min_tokens: int = 8, offload: bool = True,
                 qtype: int | None = None):
        super().__init__()
        from . import quantize

        self.num_experts, self.act_fn = bank.num_experts, bank.act_fn
        self.gpu_min_tokens, self.offload, self.qtype = gpu_min_tokens, offload, qtype
        self.shapes = (tuple(bank.gate_up_proj.shape[1:]), tuple(bank.down_proj.shape[1:]))
        weights = []
        for w in (bank.gate_up_proj.detach(), bank.down_proj.detach()):
            if qtype is not None and quantize.packs(tuple(w.shape[1:]), qtype):
                w = quantize.quantize(w, qtype, quantize.compute_device())  # uint8 [E, rows, bytes], on the CPU
            weights.append(w.cpu() if offload else w)
        if offload:  # a plain attribute: module.to(), state_dict() and memory managers pass it by
            self.__dict__["weights"] = tuple(weights)
        else:  # parameters: the host's memory manager places them with the rest of the model
            self.gate_up, self.down = (torch.nn.Parameter(w, requires_grad=False) for w in weights)
        self.traffic = Traffic()

    @property
    def banks(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__dict__["weights"] if self.offload else (self.gate_up, self.down)

    @staticmethod
    def separate(device: torch.device) -> bool:
        """Whether the compute device is another memory than the experts' (the benchmark and tests count what
        would cross by treating the CPU as one)."""
        return device.type != "cpu"

    def weight_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.banks)

    def _expert(self, index: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert `index`'s two weights on `device` in `dtype` (packed ones moved as bytes, then dequantized)."""
        from .gguf_quants import dequantize

        out = []
        for bank, shape in zip(self.banks, self.shapes):
            w = bank[index].to(device, non_blocking=True)
            out.append(dequantize(w, self.qtype, shape, dtype) if w.dtype == torch.uint8 else w.to(dtype))
        return out[0], out[1]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        device, dtype = hidden_states.device, hidden_states.dtype
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        home = self.banks[0].device
        separate = self.separate(device) if self.offload else False
        for expert in hit.flatten().tolist():
            if expert == self.num_experts:  # transformers' padding slot
                continue
            pos, token = torch.where(mask[expert])
            x = hidden_states[token]
            if not separate:  # the experts are where the tokens are (or the CPU is the compute device)
                w1, w2 = self._expert(expert, device, dtype)
                self.traffic.experts_on_cpu += device.type == "cpu"
                self.traffic.experts_on_device += device.type != "cpu"
            elif len(token) >= self.gpu_min_tokens:  # the expert's weights to the tokens
                w1, w2 = self._expert(expert, device, dtype)
                self.traffic.weight_bytes += sum(b[expert].numel() * b[expert].element_size() for b in self.banks)
                self.traffic.experts_on_device += 1
            else:  # the tokens to the expert's weights, in CPU memory, and the results back
                x = x.to(home)
                w1, w2 = self._expert(expert, home, dtype)
                self.traffic.token_bytes += 2 * x.numel() * x.element_size()
                self.traffic.experts_on_cpu += 1
            gate, up = F.linear(x, w1).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, w2).to(device)
            y = y * top_k_weights[token, pos, None]
            out.index_add_(0, token, y.to(out.dtype))
            self.traffic.tokens += len(token)
        return out


CHOICES = ["auto", "with the model", "in CPU memory"]


def wanted(choice: str, model: torch.nn.Module, device: torch.device, qtype: int | None = None) -> bool:
    """Whether to keep the experts in CPU memory: asked for, or `auto` on a GPU the whole model would not fit
    (its expert banks counted packed to `qtype` where they will be; a tenth of the card left for activations)."""
    if choice not in CHOICES:
        from .errors import LetterpressError

        raise LetterpressError(f"experts must be one of {', '.join(CHOICES)}, not {choice!r}.")
    if choice != "auto":
        return choice == "in CPU memory"
    if device.type != "cuda":
        return False
    return stored_bytes(model, qtype) > 0.9 * torch.cuda.get_device_properties(device).total_memory


def stored_bytes(model: torch.nn.Module, qtype: int | None = None) -> int:
    """The model's weight bytes with its expert banks packed to `qtype` where their rows allow."""
    from . import quantize

    total = 0
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if type(m).__name__ == EXPERTS and qtype is not None:
            total += sum(p.shape[0] * quantize.packed_size(tuple(p.shape[1:]), qtype)
                         if quantize.packs(tuple(p.shape[1:]), qtype)
                         else p.numel() * p.element_size() for p in own)
        else:
            total += sum(p.numel() * p.element_size() for p in own)
    return total


def replace_banks(model: torch.nn.Module, offload: bool, qtype: int | None = None,
                  gpu_min_tokens: int = 8) -> list[OffloadedExperts]:
    """Every expert bank of `model` replaced (in place) by an OffloadedExperts kept in CPU memory (`offload`) or
    among the parameters, packed to `qtype` where its rows allow; nothing when neither is asked. Returns them."""
    done = []
    if not offload and qtype is None:
        return done
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and type(child).__name__ == EXPERTS:
                parent._modules[name] = OffloadedExperts(child, gpu_min_tokens, offload, qtype)
                done.append(parent._modules[name])
    return done


def offload_experts(model: torch.nn.Module, gpu_min_tokens: int = 8) -> list[OffloadedExperts]:
    """Put every expert bank of `model` in CPU memory, as read (in place); returns the replacements."""
    return replace_banks(model, True, None, gpu_min_tokens)


def traffic(model: torch.nn.Module) -> Traffic:
    """The sum over the model's offloaded expert banks."""
    total = Traffic()
    for m in model.modules():
        if isinstance(m, OffloadedExperts):
            total.add(m.traffic)
    return total


def bank_bytes(model: torch.nn.Module) -> int:
    """The bytes of the model's routed experts (offloaded or not)."""
    n = 0
    for m in model.modules():
        if isinstance(m, OffloadedExperts):
            n += m.weight_bytes()  # as stored (packed bytes for a packed bank)
        elif type(m).__name__ == EXPERTS:
            n += sum(p.numel() * p.element_size() for p in m.parameters())
    return n
