"""Low-bit weights for serving: a linear layer's weight [out, in] as signed integers and an fp32 scale per output row
and group of input features, W ≈ q · scale (symmetric: no zero point, so an integer product needs no correction
per activation).

    int8  one group per row (per-output-channel scales), q in [-127, 127]
    int4  groups of `group_size` input features (128 by default), q in [-7, 7] (int4's -8 unused, so the levels
          are symmetric), two to a byte when stored

Rounding to the nearest level bounds each weight's error by half its scale; the scale is the group's largest
magnitude over the largest level, so no weight clips. The compute paths (`ops/`) take a `QuantizedWeight` in
`pack_linear` and multiply by it in `linear`, each in its own way: PyTorch's reference dequantizes to the activations'
dtype, the C++ CPU kernel multiplies integers (`ops/cpu_ops.py` says why), the Triton kernel dequantizes tiles in
registers. A quantized folder's layers arrive already as levels (`compressed_tensors.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from rung.errors import ConfigError, RungError

LARGEST = {8: 127, 4: 7}  # the largest level of each width; levels run from -LARGEST to LARGEST
BITS = {"int8": 8, "int4": 4}  # the schemes `--quantization` names, by their weights' width
QUANTIZABLE = ("_proj.weight", "_linear.weight", "lm_head.weight")  # the linear layers the engine can hold as levels
EXPERT_MATRIX = re.compile(r"\.experts\.\d+\.w[123]\.weight$")  # one MoE expert's projection in Mixtral's layout


def holds_levels(name: str) -> bool:
    """Whether a folder may hold tensor `name` as levels: a projection, the readout, or one expert's projection
    (Mixtral's per-expert layout; Granite's stacked experts, 3-D, stay float in a folder)."""
    return name.endswith(QUANTIZABLE) or EXPERT_MATRIX.search(name) is not None


@dataclass(frozen=True)
class QuantizedWeight:
    """q int8 [out, in], a level a byte (the compute paths pack int4 two to a byte), and scales fp32
    [out, in / group]."""

    q: torch.Tensor
    scales: torch.Tensor
    bits: int

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scales.shape[1]

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, features = self.q.shape
        groups = self.q.view(out, -1, self.group_size).float() * self.scales[:, :, None]
        return groups.view(out, features).to(dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> QuantizedWeight:
        """On `device`; the levels stay integers and the scales fp32 whatever `dtype` the other weights take."""
        return QuantizedWeight(self.q.to(device), self.scales.to(device), self.bits)

    @staticmethod
    def cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """The weights of several layers with the same input stacked by output row (a fused projection)."""
        if len({(p.bits, p.group_size) for p in parts}) > 1:
            raise RungError("layers fused into one product (q, k and v; gate and up) must share one quantization, "
                            f"not {sorted({(p.bits, p.group_size) for p in parts})} (bits, group size)")
        return QuantizedWeight(torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]), parts[0].bits)

    @property
    def nbytes(self) -> int:
        """Bytes of the weight as the kernels and a folder hold it: packed levels and their scales."""
        return self.q.numel() * self.bits // 8 + self.scales.numel() * self.scales.element_size()


def quantize(weight: torch.Tensor, bits: int, group_size: int = 128) -> QuantizedWeight:
    """The nearest levels of `weight` [out, in] (any float dtype) at `bits` bits, computed in fp32: int8 scales
    whole rows, int4 groups of `group_size` input features (which must divide them)."""
    high = LARGEST[bits]
    out, features = weight.shape
    size = features if bits == 8 else group_size
    if features % size:
        raise ValueError(f"a group size of {size} does not divide {features} input features")
    groups = weight.detach().float().reshape(out, features // size, size)
    scales = groups.abs().amax(-1) / high
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group: any scale is exact
    q = torch.round(groups / scales[:, :, None]).clamp_(-high, high).to(torch.int8)
    return QuantizedWeight(q.view(out, features), scales, bits)


@dataclass(frozen=True)
class WeightQuantization:
    """Which of a model's linear layers the engine quantizes, and how: the engine config's quantization settings."""

    bits: int
    group_size: int
    lm_head: bool  # the readout too

    @classmethod
    def of(cls, scheme: str, group_size: int, lm_head: bool) -> WeightQuantization | None:
        """None for `none`: the weights stay as they are."""
        return None if scheme == "none" else cls(BITS[scheme], group_size, lm_head)

    def apply(self, name: str, weight: torch.Tensor) -> torch.Tensor | QuantizedWeight:
        """`weight` quantized when this plan covers the layer `name`, else as it is."""
        if name == "lm_head.weight" and not self.lm_head:
            return weight
        if self.bits != 8 and weight.shape[1] % self.group_size:
            raise ConfigError("quantization_group_size", f"{self.group_size} does not divide "
                              f"{name.removesuffix('.weight')}'s {weight.shape[1]} input features; choose a divisor "
                              "of every projection's input size")
        return quantize(weight, self.bits, self.group_size)
