"""What this machine's CPU multiplies in hardware, for the choices that depend on it (serving dtype warnings, the
precision Muon orthogonalizes in)."""

from __future__ import annotations

import torch


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX). Elsewhere oneDNN converts every product:
    bf16 decode ran at 0.13-0.28x fp32 on an AVX2-only EPYC, a bf16 matrix product ~30x slower than fp32
    (`bench/RESULTS.md`). A torch without these (private) probes is taken at its word that it knows best: True."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return not all(probes) or any(probe() for probe in probes)
