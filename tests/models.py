"""Tiny Llama-style megatron-core configs and models shared by the tests."""

import torch
import torch.nn.functional as F


def llama_config(num_layers=4, hidden=32, heads=4, groups=2, ffn=48, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=ffn,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        params_dtype=torch.float32,
        init_method_std=0.2,  # large weights so the branches are far from zero
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def gpt_model(config, layer_spec, vocab=64, seq=16):
    from megatron.core.models.gpt.gpt_model import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=vocab,
        max_sequence_length=seq,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )


class TE:  # stand-ins for Transformer Engine's classes, which cannot be imported without a GPU
    class TENorm: ...
    class TELayerNormColumnParallelLinear: ...
    class TEColumnParallelLinear: ...
    class TERowParallelLinear: ...
    class TEDotProductAttention: ...


class FakeTESpecProvider:
    """Same interface as megatron-core's TESpecProvider, returning the stand-ins."""

    def column_parallel_linear(self):
        return TE.TEColumnParallelLinear

    def row_parallel_linear(self):
        return TE.TERowParallelLinear

    def fuse_layernorm_and_linear(self):
        return True

    def column_parallel_layer_norm_linear(self):
        return TE.TELayerNormColumnParallelLinear

    def layer_norm(self, rms_norm=False, for_qk=False, has_residual=False):
        return TE.TENorm

    def core_attention(self):
        return TE.TEDotProductAttention

    def activation_func(self):
        return None

    def linear(self):
        return TE.TEColumnParallelLinear
