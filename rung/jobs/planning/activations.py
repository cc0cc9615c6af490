"""Activation memory of one training micro-batch, measured from the model's own code rather than a formula.

Each piece of the model (a block, its feed-forward half, the embedding with the head and loss) runs forward once
on the meta device — shapes only, no memory, any size — while a saved-tensors hook records every tensor autograd
keeps for backward. Distinct storages are summed, parameters excluded, so the count follows the code (fp32
normalisation inside a bf16 model, SDPA's log-sum-exp, the fp32 log-softmax of the loss) without a hand-kept
formula to drift from it. The meta device has no fused attention of its own and F.scaled_dot_product_attention
would fall back to the math path (which keeps the seq × seq scores); during the trace it runs the fused CPU
flash kernel's meta form instead, which keeps what flash and memory-efficient attention keep on a GPU: q, k, v, the
output and fp32 log-sum-exp. Every saved tensor is linear in the number of sequences, so one sequence is traced and
multiplied.

An MoE layer's routing has data-dependent shapes that the meta device cannot follow; its feed-forward is counted
as the dense one's per assignment (top_k experts, plus the shared expert) and the router's fp32 probabilities,
which is exact for dropless routing and an upper bound with capacity dropping.
"""

from __future__ import annotations

from dataclasses import dataclass

from unittest import mock

import torch
import torch.nn.functional as F

from rung.config import evolve
from rung.jobs.config import RunConfig
from rung.jobs.model.build import build_model
from rung.jobs.model.transformer import language_model_loss


@dataclass(frozen=True, slots=True)
class ActivationBytes:
    """Bytes per sequence of `seq_len` tokens."""

    block: int  # everything one transformer block keeps for backward
    ffn: int  # of `block`, what its feed-forward half (norm + MLP or MoE) keeps
    block_input: int  # one [seq, d_model] activation: what a recomputed region keeps instead
    head: int  # embedding, final norm, LM head and loss, the logits included (the step holds them)
    logits_grad: int  # backward's first transient: the fp32 gradient of the log-softmax and of the logits

    def per_micro_batch(self, n_layers: int, recompute: str) -> tuple[int, int]:
        """(kept from forward to backward, the largest extra working set in backward) for one sequence. The logits'
        gradient is freed before the last block's backward begins, so a recomputed block's activations replace it
        rather than add to it."""
        if recompute == "full":
            return self.head + n_layers * self.block_input, max(self.logits_grad, self.block)
        if recompute == "selective":
            return self.head + n_layers * (self.block - self.ffn + self.block_input), max(self.logits_grad, self.ffn)
        return self.head + n_layers * self.block, self.logits_grad


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Stands in for F.scaled_dot_product_attention on the meta device: the fused kernel's saved tensors."""
    if enable_gqa and k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=is_causal, scale=scale)[0]


def _saved_bytes(run, parameters) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while `run()` executes."""
    excluded = {p.untyped_storage()._cdata for p in parameters}
    saved: dict[int, int] = {}
    keep = []  # hold the tensors, so no storage is freed and its address reused during the trace

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in excluded:
            saved[storage._cdata] = storage.nbytes()
        keep.append(tensor)
        return tensor

    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
          mock.patch.object(F, "scaled_dot_product_attention", _fused_attention)):
        run()
    return sum(saved.values())


def activation_bytes(cfg: RunConfig) -> ActivationBytes:
    """Traced on the meta device for one sequence of `train.seq_len` tokens in the training dtype."""
    # multipliers change no shape: a one-block dense model of the same width is its own base shape
    dense = evolve(cfg, {"model.n_layers": 1, "model.moe": None, "param.base_depth": 1, "train.expert_parallel": 1})
    dtype = torch.bfloat16 if cfg.train.dtype == "bfloat16" else torch.float32
    seq, width = cfg.train.seq_len, cfg.model.d_model
    with torch.device("meta"):
        model, _ = build_model(dense)
        model = model.to(dtype)
        tokens = torch.zeros(1, seq, dtype=torch.long)
        block = model.layers[0]
        x = torch.empty(1, seq, width, dtype=dtype, requires_grad=True)
        cos, sin = model.rope_cos[:seq].to(dtype), model.rope_sin[:seq].to(dtype)
        parameters = list(model.parameters())
        block_bytes = _saved_bytes(lambda: block(x, cos, sin), parameters)
        ffn_bytes = _saved_bytes(lambda: block._ffn(x), parameters)
        mlp_bytes = _saved_bytes(lambda: block.mlp(x), parameters)
        whole = _saved_bytes(lambda: language_model_loss(model(tokens), tokens), parameters)
    element = torch.finfo(dtype).bits // 8
    logits = seq * cfg.model.vocab_size * element
    head = whole - block_bytes + logits
    moe = cfg.model.moe
    if moe is not None:
        experts = moe.top_k + (1 if moe.shared_expert else 0)
        routing = seq * moe.n_experts * 4 * 2 + seq * moe.top_k * width * element * 2  # probs, logits; gathered
        extra = (experts - 1) * mlp_bytes + routing
        block_bytes, ffn_bytes = block_bytes + extra, ffn_bytes + extra
    return ActivationBytes(block=block_bytes, ffn=ffn_bytes, block_input=seq * width * element, head=head,
                           logits_grad=2 * seq * cfg.model.vocab_size * 4)
