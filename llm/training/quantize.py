"""QLoRA (Dettmers et al. 2023): the frozen base of every adapted projection in 4-bit NormalFloat (bitsandbytes).

``nf4(model, device)`` turns each ``LoRALinear`` of the model into ``NF4LoRALinear``: its ``weight`` becomes a
bitsandbytes ``Params4bit`` (NF4 codes in blocks of 64, the block scales themselves quantized: "double
quantization", ~4.13 bits per weight) on ``device``, and the base product dequantizes it on the fly in bf16.
The adapters stay float32 and train as in LoRA. Runs refuse ``adapter=qlora`` without CUDA before anything
loads (llm/app/spec.py); the layer itself also computes on CPU, which is how the tests check it.
"""

from __future__ import annotations

import torch
from torch import nn

from llm.core import lora

COMPUTE_DTYPE = torch.bfloat16  # what the 4-bit codes are dequantized to for the matmul (QLoRA's choice)


class NF4LoRALinear(lora.LoRALinear):
    """LoRALinear whose frozen ``weight`` is a bitsandbytes ``Params4bit``; x (..., in) -> (..., out)."""

    def base(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        w = self.weight
        return bnb.matmul_4bit(x.to(COMPUTE_DTYPE), w.t(), quant_state=w.quant_state).to(x.dtype)

    def reset_parameters(self) -> None:  # the codes are the base weights: only the adapters can be re-drawn
        if self.lora_a is not None:
            self.reset_adapter()


def nf4(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Quantize the base weight of every adapted projection to NF4 on ``device`` (in place)."""
    import bitsandbytes as bnb

    for _, layer in lora.layers(model):
        if isinstance(layer, NF4LoRALinear):
            continue
        w = layer.weight.detach().to(COMPUTE_DTYPE)
        # Params4bit quantizes when moved to a device; the original tensor is dropped with the old Parameter
        layer.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True).to(
            device
        )
        layer.__class__ = NF4LoRALinear
    return model


def dequantized(layer: NF4LoRALinear) -> torch.Tensor:
    """The base weight the layer computes with, (out, in), float32 (for tests and the merged export)."""
    import bitsandbytes.functional as bnbf

    w = layer.weight
    return bnbf.dequantize_4bit(w.data, w.quant_state).float()

