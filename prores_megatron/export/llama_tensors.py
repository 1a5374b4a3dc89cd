"""Megatron GPT layer tensors -> Hugging Face Llama tensors, with ProRes folded in (pure tensor math).

HF keeps q, k, v and gate, up apart: the fused tensors are split by ``checkpoint.tensor_names``.

Contract:
- ``fold_branch(t, a)``: a Pre-LN/LNS branch ends in a linear layer, so
  ``a*(W z + b) = (a W) z + a b`` (docs/method.md §10.12): the ProRes alpha of a layer is folded into
  its attention output projection and MLP down projection, weight and bias, in fp32.
- ``norm_gain(w, zero_centered, scale)``: the effective RMSNorm gain ``(1 + w if zero_centered
  else w) * scale``, in fp32 (``scale`` = LNS's fixed 1/sqrt(l), or 1).
- ``convert_layer(layout, i, tensors)``: yields one layer's HF tensors, in
  ``layout.hf_layer_tensors(i)`` order. Folded tensors come back in fp32; the others keep their
  checkpoint dtype. The caller rounds each to the output dtype exactly once.
"""

import torch

from ..checkpoint.tensor_names import FC1, FC2, LAYER_PREFIX, PROJ, QKV, split_gate_up, split_qkv


def fold_branch(t, a: float):
    """``a * t`` in fp32. alpha == 1 returns the values unchanged (IEEE: x * 1 == x)."""
    t = t.float()
    return t if a == 1.0 else t * a


def norm_gain(w, zero_centered: bool, scale: float = 1.0):
    g = w.float()
    if zero_centered:
        g = g + 1.0  # --apply-layernorm-1p stores w with gain 1 + w (zero-centred gamma)
    return g if scale == 1.0 else g * scale


def convert_layer(layout, i: int, tensors: dict):
    """See module docstring. ``tensors``: torch_dist layer names (``decoder.layers.…``) -> layer i.

    A generator, in ``layout.hf_layer_tensors(i)`` order, so at most one converted tensor exists
    at a time next to the layer that was read.
    """
    a = layout.alphas[i]
    s = layout.norm_scales[i]
    zc = layout.zero_centered_gamma
    m = {name[len(LAYER_PREFIX):]: t for name, t in tensors.items()}
    p = f"model.layers.{i}."
    yield p + "input_layernorm.weight", norm_gain(m[QKV + "layer_norm_weight"], zc, s)
    qkv = split_qkv(m[QKV + "weight"], layout.heads, layout.groups, layout.head_dim)
    qkv_b = None
    if layout.attention_bias:
        qkv_b = split_qkv(m[QKV + "bias"], layout.heads, layout.groups, layout.head_dim)
    for j, proj in enumerate("qkv"):
        yield p + f"self_attn.{proj}_proj.weight", qkv[j]
        if qkv_b is not None:
            yield p + f"self_attn.{proj}_proj.bias", qkv_b[j]
    del qkv, qkv_b
    yield p + "self_attn.o_proj.weight", fold_branch(m[PROJ + "weight"], a)
    if layout.attention_bias:
        bias = m.get(PROJ + "bias")
        # A qkv-only bias (--add-qkv-bias) has no output bias in Megatron; HF's has one: zero.
        yield p + "self_attn.o_proj.bias", (
            fold_branch(bias, a) if bias is not None else torch.zeros(layout.hidden, dtype=torch.float32)
        )
    yield p + "post_attention_layernorm.weight", norm_gain(m[FC1 + "layer_norm_weight"], zc, s)
    gate, up = split_gate_up(m[FC1 + "weight"])
    gate_b, up_b = split_gate_up(m[FC1 + "bias"]) if layout.linear_bias else (None, None)
    for name, w, b in (("gate", gate, gate_b), ("up", up, up_b)):
        yield p + f"mlp.{name}_proj.weight", w
        if b is not None:
            yield p + f"mlp.{name}_proj.bias", b
    yield p + "mlp.down_proj.weight", fold_branch(m[FC2 + "weight"], a)
    if layout.linear_bias:
        yield p + "mlp.down_proj.bias", fold_branch(m[FC2 + "bias"], a)
