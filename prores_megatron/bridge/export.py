"""Hugging Face export of a Megatron-Bridge checkpoint: ``python -m prores_megatron.bridge.export CKPT OUT``.

Contract: a Bridge ``iter_*`` directory is a torch_dist checkpoint (megatron-core's
``dist_checkpointing.save``, the same tensor names as Megatron-LM's) plus ``train_state.pt`` and
``run_config.yaml``, and its common state holds no Megatron-LM ``args``. ``saved_args(path)``
reads ``run_config.yaml`` with ``yaml.safe_load`` (data only: nothing is instantiated or
imported, and no pickle is read) and returns the model's settings under Megatron-LM's argument
names, ProRes settings included (``checkpoint_metadata.settings_from_run_config``); the exporter
(``export.export_to_hf(..., saved_args=...)``) does the rest exactly as for Megatron-LM: the same
checks, alpha folding, atomic output and flags (``prores-megatron-convert-to-hf --help``).
A checkpoint without recorded ProRes settings exports as a vanilla model only with
``--prores-schedule none``-style overrides, as the exporter already requires.
"""

import argparse
import sys

import yaml

from ..checkpoint.base import CheckpointError, resolve_iteration_dir
from ..export.convert_to_hf import main as convert_main
from .checkpoint_metadata import settings_from_run_config
from .compat import ACTIVATION_KEY, RUN_CONFIG, model_section


def _activation_name(value) -> str:
    # Bridge's YAML writer stores a function as {"_target_": "torch.nn.functional.silu", "_call_": false}.
    if isinstance(value, dict):
        value = value.get("_target_", "")
    return str(value or "").rsplit(".", 1)[-1]


def _padded_vocab(model, tp):
    vocab = model.get("vocab_size")
    if vocab is None:
        return None
    if not model.get("should_pad_vocab", False):
        return int(vocab)
    multiple = int(model.get("make_vocab_size_divisible_by") or 1) * tp
    return -(-int(vocab) // multiple) * multiple


def saved_args(path) -> argparse.Namespace:
    """See module docstring; ``CheckpointError`` naming the file when it is missing or not Bridge's."""
    it_dir = resolve_iteration_dir(path)
    config_file = it_dir / RUN_CONFIG
    if not config_file.is_file():
        raise CheckpointError(f"{it_dir}: no {RUN_CONFIG}, so not a Megatron-Bridge checkpoint "
                              "(a Megatron-LM checkpoint is exported with prores-megatron-convert-to-hf)")
    try:
        run_config = yaml.safe_load(config_file.read_text())
        model = model_section(run_config)
    except (yaml.YAMLError, KeyError, AttributeError, TypeError) as err:
        raise CheckpointError(f"{config_file}: not a Bridge run config with a 'model' section ({err})") from None
    tp = int(model.get("tensor_model_parallel_size") or 1)
    recorded = (model.get("extra_checkpoint_metadata") or {}).get(ACTIVATION_KEY)
    activation = _activation_name(model.get("activation_func") or recorded)
    if not activation:
        raise CheckpointError(
            f"{config_file}: records no activation_func (Bridge's GPTModelConfig drops callables when it "
            "writes run_config.yaml, and the run did not use attach_prores, which records it), so SwiGLU "
            "cannot be told from another gated MLP; refusing to export")
    gated = bool(model.get("gated_linear_unit"))
    groups = model.get("num_query_groups")
    tokenizer = run_config.get("tokenizer") or {}
    args = argparse.Namespace(
        num_layers=model.get("num_layers"), hidden_size=model.get("hidden_size"),
        num_attention_heads=model.get("num_attention_heads"), num_query_groups=groups,
        group_query_attention=groups is not None, kv_channels=model.get("kv_channels"),
        ffn_hidden_size=model.get("ffn_hidden_size"), swiglu=gated and activation == "silu",
        squared_relu=activation == "squared_relu", normalization=model.get("normalization"),
        layernorm_epsilon=model.get("layernorm_epsilon"), add_bias_linear=model.get("add_bias_linear"),
        add_qkv_bias=model.get("add_qkv_bias"), init_method_std=model.get("init_method_std"),
        layernorm_zero_centered_gamma=model.get("layernorm_zero_centered_gamma"),
        position_embedding_type=model.get("position_embedding_type"), rotary_base=model.get("rotary_base"),
        use_rope_scaling=model.get("rope_scaling"), rope_scaling_factor=model.get("rope_scaling_factor"),
        rotary_seq_len_interpolation_factor=model.get("seq_len_interpolation_factor"),
        max_position_embeddings=model.get("seq_length"), seq_length=model.get("seq_length"),
        untie_embeddings_and_output_weights=not model.get("share_embeddings_and_output_weights", True),
        num_experts=model.get("num_moe_experts"), multi_latent_attention=model.get("multi_latent_attention"),
        tensor_model_parallel_size=tp, make_vocab_size_divisible_by=model.get("make_vocab_size_divisible_by"),
        vocab_size=model.get("vocab_size") or tokenizer.get("vocab_size"),
        padded_vocab_size=_padded_vocab(model, tp),
        tokenizer_type=tokenizer.get("tokenizer_type"), tokenizer_model=tokenizer.get("tokenizer_model"),
    )
    prores = settings_from_run_config(run_config, str(config_file))
    if prores is not None:
        args.prores_schedule, args.prores_warmup_steps = prores.schedule, prores.warmup_steps
        args.prores_arch, args.prores_start_step = prores.arch, prores.start_step or 0
    return args


def main(argv=None):
    """``prores-megatron-convert-to-hf``'s flags and exit codes, for a Bridge checkpoint."""
    return convert_main(argv, saved_args_from=saved_args)


if __name__ == "__main__":
    sys.exit(main())
