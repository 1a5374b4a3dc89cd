"""Megatron GPT tensor names and the layouts of its fused tensors (pure; torch tensors in, views out).

Contract:
- ``LAYER_PREFIX`` (``decoder.layers.``) and the per-layer prefixes ``QKV``, ``PROJ``, ``FC1``,
  ``FC2``, plus ``EMBEDDING``, ``FINAL_NORM``, ``OUTPUT``: torch_dist's names (docs/megatron.md §7).
- ``split_qkv(w, heads, groups, head_dim)``: Megatron's fused QKV stores, for each query group,
  its ``heads/groups`` query heads then one key and one value head; returns ``(q, k, v)`` with
  the heads in order. Works on weights ``[rows, H]`` and biases ``[rows]``.
- ``split_gate_up(w)``: SwiGLU's fc1 is ``[gate; up]`` along the rows; returns ``(gate, up)``.
"""

LAYER_PREFIX = "decoder.layers."
QKV, PROJ = "self_attention.linear_qkv.", "self_attention.linear_proj."
FC1, FC2 = "mlp.linear_fc1.", "mlp.linear_fc2."
EMBEDDING, FINAL_NORM, OUTPUT = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"


def split_qkv(w, heads: int, groups: int, head_dim: int):
    per_group = heads // groups
    rest = w.shape[1:]
    if w.shape[0] != (heads + 2 * groups) * head_dim:
        raise ValueError(f"QKV has {w.shape[0]} rows, expected (heads + 2*groups) * head_dim = "
                         f"{(heads + 2 * groups) * head_dim}")
    grouped = w.reshape(groups, per_group + 2, head_dim, *rest)
    q = grouped[:, :per_group].reshape(heads * head_dim, *rest)
    k = grouped[:, per_group].reshape(groups * head_dim, *rest)
    v = grouped[:, per_group + 1].reshape(groups * head_dim, *rest)
    return q, k, v


def split_gate_up(w):
    if w.shape[0] % 2:
        raise ValueError(f"SwiGLU fc1 has an odd number of rows ({w.shape[0]})")
    gate, up = w.chunk(2, dim=0)
    return gate, up
