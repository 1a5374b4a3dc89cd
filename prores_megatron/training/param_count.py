"""Parameter count of a megatron-core GPT (Llama-style) model, from its shape alone.

Contract: ``count_parameters(config, padded_vocab_size, tied, position_embedding_type,
max_position_embeddings)`` returns a ``ParamCount`` of the parameters megatron-core allocates for a
dense GPTModel built from ``config`` (a ``TransformerConfig``): word (and learned position)
embeddings, per layer the attention with grouped-query K/V, the MLP (SwiGLU's fc1 is two
projections), the biases the config enables and the norms (RMSNorm: weight; LayerNorm: weight +
bias), the final norm and an untied output layer. Tied weights are counted once. Shapes it does not
model (MoE, multi-latent attention, heterogeneous layers) raise ``NotImplementedError`` saying so.
Pure arithmetic on config fields: no torch, no process group.
"""

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class ParamCount:
    hidden_size: int
    vocab_size: int  # padded, as allocated
    tied: bool  # output layer shares the word embeddings
    embedding: int  # word embeddings (+ learned absolute position embeddings)
    per_layer: int  # one decoder layer, = attention + mlp + norms
    attention: int  # QKV + output projection (+ biases, + QK norms)
    mlp: int  # fc1 + fc2 (+ biases)
    norms: int  # the layer's two pre-norms
    final_norm: int
    output_layer: int  # 0 when tied
    total: int  # unique parameters of the model

    def as_dict(self):
        return asdict(self)

    def chunk_params(self, n_layers: int, embedding: bool, loss: bool) -> int:
        """Parameters one pipeline chunk allocates: with tied weights and PP > 1 the last stage
        holds its own copy of the word embeddings as the output layer (kept in sync by Megatron)."""
        n = n_layers * self.per_layer
        if embedding:
            n += self.embedding
        if loss:
            tied_copy = self.vocab_size * self.hidden_size if self.tied and not embedding else 0
            n += self.final_norm + self.output_layer + tied_copy
        return n


def _norm(size: int, normalization: str) -> int:
    if normalization == "RMSNorm":
        return size
    if normalization == "LayerNorm":
        return 2 * size
    raise NotImplementedError(f"parameter count: normalization {normalization!r} is not modelled")


def count_parameters(
    config,
    padded_vocab_size: int,
    tied: bool,
    position_embedding_type: str = "rope",
    max_position_embeddings: Optional[int] = None,
) -> ParamCount:
    if getattr(config, "num_moe_experts", None):
        raise NotImplementedError("parameter count: MoE layers (--num-experts) are not modelled")
    if getattr(config, "multi_latent_attention", False):
        raise NotImplementedError("parameter count: multi-latent attention is not modelled")
    if getattr(config, "heterogeneous_block_specs", False):
        raise NotImplementedError("parameter count: heterogeneous layers are not modelled")
    h = config.hidden_size
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    d = config.kv_channels or h // heads
    ffn = config.ffn_hidden_size
    bias = bool(config.add_bias_linear)
    qkv_bias = bias or bool(getattr(config, "add_qkv_bias", False))

    qkv_out = (heads + 2 * groups) * d  # Q for every head, K and V once per query group
    attention = h * qkv_out + (qkv_out if qkv_bias else 0) + heads * d * h + (h if bias else 0)
    if config.qk_layernorm:
        attention += 2 * _norm(d, config.normalization)  # one norm over head_dim for Q, one for K
    fc1_out = 2 * ffn if config.gated_linear_unit else ffn  # SwiGLU: gate and up projections
    mlp = h * fc1_out + (fc1_out if bias else 0) + ffn * h + (h if bias else 0)
    norms = 2 * _norm(h, config.normalization)
    per_layer = attention + mlp + norms

    embedding = padded_vocab_size * h
    if position_embedding_type == "learned_absolute":
        embedding += max_position_embeddings * h
    final_norm = _norm(h, config.normalization)
    output_layer = 0 if tied else padded_vocab_size * h
    total = embedding + config.num_layers * per_layer + final_norm + output_layer
    return ParamCount(
        hidden_size=h,
        vocab_size=padded_vocab_size,
        tied=tied,
        embedding=embedding,
        per_layer=per_layer,
        attention=attention,
        mlp=mlp,
        norms=norms,
        final_norm=final_norm,
        output_layer=output_layer,
        total=total,
    )
