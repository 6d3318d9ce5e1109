"""Linear layers prepared for fast CPU inference, swapped into a model in place.

Decoding one token reads every weight once, so on a CPU its speed is set by how fast the
matrix-vector products stream weights from memory. Measured on a 2-core AVX-512 machine
(benchmarks/decode_speed.py), `nn.Linear` (MKL) reaches about half the memory bandwidth at
batch 1; the same weights reordered once into oneDNN's blocked layout (what torch.compile's CPU
path does after freezing) reach the bandwidth limit. Options:

    none          fp32, oneDNN-packed (layers of at least PACK_MIN_WEIGHTS): same results up to float rounding
    bf16          weights and matrix products in bfloat16 (activations stay fp32 between layers)
    int8          weight-only int8: one scale per output channel, activations stay fp32
    int8-dynamic  int8 weights, and activations rounded to int8 per call (fbgemm): fastest, least exact
                  (built on PyTorch's quantized tensors, which PyTorch has deprecated)

The model becomes inference-only: parameters of the swapped layers are no longer trainable
parameters, and the state dict changes, so load a fresh model to train or save.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ..errors import LmforgeError

QUANTIZE = ("none", "bf16", "int8", "int8-dynamic")
PACK_MIN_WEIGHTS = 1 << 19  # fp32 packing skips layers smaller than this (768 x 768 is packed, 192 x 576 is not)


def _mkldnn_ok() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class PackedLinear(nn.Module):
    """x W^T + b with W reordered once into oneDNN's layout (fp32 or bf16)."""

    def __init__(self, linear: nn.Linear, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(
            linear.weight.detach().to(dtype).contiguous(), 1
        )  # batch-size hint 1: decode
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    @torch.compiler.disable  # an opaque oneDNN tensor: torch.compile runs this layer as it is
    def forward(self, x):
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype).contiguous(), self.packed, self.bias, "none", [], "")
        return y.to(x.dtype)


class Int8Linear(nn.Module):
    """Weight-only int8: W ~ q * scale with one scale per output row; x stays in its own dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).float().contiguous(), self.qweight, self.scale)
        y = y.view(*shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


class DynamicInt8Linear(nn.Module):
    """int8 weights (one scale per output row) and activations quantised to int8 on the fly (fbgemm)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).double()
        with warnings.catch_warnings():  # deprecated in PyTorch; the check in pack_for_inference guards their removal
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(
                w, scale, torch.zeros(w.shape[0], dtype=torch.long), axis=0, dtype=torch.qint8
            )
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(q, bias)

    @torch.compiler.disable
    def forward(self, x):
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self.packed, True).to(x.dtype)


def pack_for_inference(model: nn.Module, quantize: str | None = "none") -> nn.Module:
    """Swap the model's nn.Linear layers for faster CPU inference versions (in place); returns the model.

    On a non-CPU device, or without oneDNN, "none" leaves the model as it is and the others are an error.
    """
    quantize = quantize or "none"
    if quantize not in QUANTIZE:
        raise LmforgeError(f"unknown quantization {quantize!r} (choose from {', '.join(QUANTIZE)})")
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if not on_cpu or not _mkldnn_ok():
        if quantize == "none":
            return model
        raise LmforgeError(
            f"--quantize {quantize} is for CPU inference (this model is on {next(model.parameters()).device})"
        )
    if quantize == "int8" and not hasattr(torch, "_weight_int8pack_mm"):
        raise LmforgeError("this PyTorch build has no int8 weight-only matmul (torch._weight_int8pack_mm)")
    if quantize == "int8-dynamic" and not (
        hasattr(torch.ops.quantized, "linear_dynamic") and hasattr(torch, "quantize_per_channel")
    ):
        raise LmforgeError("this PyTorch build has no dynamic int8 matmul (torch.ops.quantized.linear_dynamic)")
    make = {
        "none": lambda lin: PackedLinear(lin, torch.float32),
        "bf16": lambda lin: PackedLinear(lin, torch.bfloat16),
        "int8": Int8Linear,
        "int8-dynamic": DynamicInt8Linear,
    }[quantize]
    # Packing pays off when a layer streams its weights from memory; a small one that stays in cache is faster as it is.
    smallest = PACK_MIN_WEIGHTS if quantize == "none" else 0
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and child.weight.dtype == torch.float32 and child.weight.numel() >= smallest
    ]
    with torch.no_grad():
        for parent, name, child in targets:
            setattr(parent, name, make(child))
    model.eval()
    return model
