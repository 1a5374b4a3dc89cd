"""Megatron-LM GPT/Llama pretraining with ProRes: ``python -m prores_megatron.training.pretrain_gpt <flags>``.

Contract: takes every Megatron-LM ``pretrain_gpt.py`` flag plus the ``--prores-*`` flags, and runs
Megatron-LM's own ``pretrain()`` loop (megatron-core 0.19 calling convention) with the ProRes layer
spec. alpha is set from ``args.curr_iteration`` (completed optimizer steps, restored from the
checkpoint on resume; minus ``--prores-start-step``) once per iteration before the forward-backward
pass, so recompute, micro-batches, graph replays and every rank see the same value; the coverage
guard runs once, collectively, right after the model is built.
Data: ``--data-path`` indexed datasets or ``--mock-data``. On a machine without CUDA the CPU shim is
installed first (gloo; see ``cpu_shim``); ``megatron.training`` is imported inside functions, after it.
"""

import sys
import time
from functools import partial

import torch

from .arguments import ProResArgumentError, add_prores_args, describe_prores_args, validate_prores_args
from .model_config import attach_monitor, configure_model_config

_PROGRAM_START = time.time()  # as Megatron-LM's pretrain_gpt.py, for its start-up timing report


def get_batch(data_iterator, vp_stage=None):
    """This micro-batch's tensors; stages without embedding or loss need none.

    Every tensor-parallel rank of the first/last stage reads the same sample from its own loader
    (the dataset is built on every TP rank), so no broadcast is needed.
    """
    from megatron.core import parallel_state
    from megatron.training.utils import is_first_or_last_pipeline_stage

    if not is_first_or_last_pipeline_stage(vp_stage):
        return None, None, None, None, None
    batch = next(data_iterator)
    if parallel_state.get_context_parallel_world_size() > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    out = []
    for key in ("tokens", "labels", "loss_mask", "attention_mask", "position_ids"):
        value = batch.get(key)
        out.append(value.to(device, non_blocking=True) if value is not None else None)
    return out


def loss_func(loss_mask, output_tensor):
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    args = get_args()
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    rerun = get_rerun_state_machine()
    if args.check_for_nan_in_loss_and_grad:
        for bad, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            rerun.validate_result(
                result=loss,
                rejection_func=bad,
                message=f"found {what} in local forward loss calculation",
                tolerance=0.0,
                fatal=True,
            )
    if args.check_for_spiky_loss:  # as Megatron-LM's pretrain_gpt.py: 10x the largest loss seen
        rerun.validate_result(
            result=loss,
            rejection_func=partial(rerun.is_unexpectedly_large, threshold=10, context="loss"),
            message="Spiky loss",
            tolerance=0.0,
            fatal=False,
        )
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    return loss, num_tokens, report


def make_forward_step(args, monitor=None):
    """Megatron's forward step. It does not touch alpha: ``configure_model_config`` sets it once per
    iteration before the forward-backward pass, outside anything a CUDA graph captures."""

    def forward_step(data_iterator, model):
        from megatron.core.utils import get_attr_wrapped_model
        from megatron.training import get_args, get_timers

        if monitor is not None and model.training:
            monitor.before_forward(get_args().curr_iteration, True)
        timers = get_timers()
        timers("batch-generator", log_level=2).start()
        vp_stage = get_attr_wrapped_model(model, "vp_stage")
        tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, vp_stage)
        timers("batch-generator").stop()
        output = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
        return output, partial(loss_func, loss_mask)

    return forward_step


def gpt_dataset_config(args):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training import get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    sequences_per_dataset = None
    if args.per_dataset_sequences_path is not None:
        import json

        with open(args.per_dataset_sequences_path, "r") as f:
            sequences_per_dataset = json.load(f)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        # The rest of Megatron-LM's core_gpt_dataset_config_from_args (core_r0.19.0), field for field.
        multiple_validation_sets=args.multiple_validation_sets,
        full_validation=args.full_validation,
        object_storage_cache_path=args.object_storage_cache_path,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens,
        fast_cache_load=args.dataloader_fast_cache_load,
        sequences_per_dataset=sequences_per_dataset,
        defer_npy_index_mmap=args.dataloader_defer_npy_index_mmap,
        context_parallel_size=args.context_parallel_size,
        data_parallel_size=args.data_parallel_size,
        sequence_parallel_size=args.tensor_model_parallel_size * args.sequence_parallel,
    )


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, print_rank_0
    from megatron.training.utils import is_first_or_last_pipeline_stage

    args = get_args()
    kind = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0(f"> building {kind.__name__} train/valid/test splits ...")
    return BlendedMegatronDatasetBuilder(
        kind,
        train_val_test_num_samples,
        lambda: is_first_or_last_pipeline_stage(vp_stage),
        gpt_dataset_config(args),
    ).build()


datasets_provider.is_distributed = True  # every rank builds its own loader; see get_batch


def get_embedding_ranks(pp_ranks):
    """Megatron-LM pretrain_gpt.py's: the first stage, the last one (tied output layer) and the MTP
    stages hold the embedding."""
    from megatron.core.transformer.multi_token_prediction import get_mtp_ranks
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    ranks = [pp_ranks[0]]
    if len(pp_ranks) > 1:
        args = get_args()
        if not args.untie_embeddings_and_output_weights:
            ranks.append(pp_ranks[-1])
        ranks.extend(get_mtp_ranks(pp_ranks, core_transformer_config_from_args(args)))
    return sorted(set(ranks))


# Megatron-LM pretrain_gpt.py features this entry point does not implement (docs/megatron.md §3,
# "Differences from Megatron-LM's pretrain_gpt.py"): (args attribute, flag, why). Refused by name.
UNSUPPORTED_FLAGS = (
    ("sft", "--sft", "SFT datasets with packed sequences (cu_seqlens) are not in this entry point's get_batch"),
    ("fim_data", "--fim-data", "the FIM dataset is not in this entry point's dataset provider"),
    ("logits_load_dir", "--logits-load-dir", "offline distillation from cached logits is not in its loss function"),
    ("overlap_moe_expert_parallel_comm", "--overlap-moe-expert-parallel-comm",
     "its forward step does not build the schedule plan the combined 1F1B overlap asks for"),
    ("dataloader_inter_document_masking", "--dataloader-inter-document-masking",
     "packed-sequence (cu_seqlens) batches are not in this entry point's get_batch"),
    ("hybrid_context_parallel", "--hybrid-context-parallel", "hybrid CP batches are not in its get_batch"),
)


def refuse_unsupported(args) -> None:
    for attr, flag, why in UNSUPPORTED_FLAGS:
        if getattr(args, attr, None):
            raise ProResArgumentError(
                f"{flag}: {why}. Use Megatron-LM's own pretrain_gpt.py with the ProRes patch "
                "(patches/README.md), which keeps its data pipeline")


def main(argv=None):
    from .cpu_shim import install_cpu_shim

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    install_cpu_shim()  # no-op with CUDA; must precede every megatron import
    from .dataset_helpers import skip_helper_build_if_prebuilt

    skip_helper_build_if_prebuilt()  # a pip-installed megatron-core has no Makefile (GPU and CPU)

    from ..core.compat import MEGATRON_CORE_TARGET  # noqa: F401  (raises on an unsupported megatron-core)

    main_entry = time.time()
    from megatron.core.enums import ModelType
    from megatron.core.package_info import __version__ as mcore_version
    from megatron.core.utils import get_te_version, get_torch_version
    from megatron.training import inprocess_restart, pretrain, print_rank_0, set_startup_timestamps
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    print_rank_0(f"> PyTorch version ................ {get_torch_version()}")
    print_rank_0(f"> Megatron-Core version .......... {mcore_version}")
    try:
        print_rank_0(f"> Transformer Engine version ... {get_te_version()}")
    except Exception:  # no TE (CPU): Megatron-LM's script would fail here; only the banner differs
        print_rank_0("> Transformer Engine version ... not installed")
    if torch.cuda.is_available():  # its all_reduce runs on device='cuda'
        set_startup_timestamps(program_start=_PROGRAM_START, main_entry=main_entry)
    # As Megatron-LM's pretrain_gpt.py: --inprocess-restart wraps pretrain (nvidia-resiliency-ext).
    pretrain, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)

    args = parse_and_validate_args(extra_args_provider=add_prores_args,
                                   args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    try:
        validate_prores_args(args)
        refuse_unsupported(args)
    except ProResArgumentError as err:
        print(f"prores_megatron.training.pretrain_gpt: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print_rank_0(describe_prores_args(args))

    model_cfg = configure_model_config(gpt_config_from_args(args), args)
    monitor = attach_monitor(model_cfg, args)
    cfg = pretrain_cfg_container_from_args(args, model_cfg)
    pretrain(cfg, datasets_provider, ModelType.encoder_or_decoder, make_forward_step(args, monitor),
             store=store, get_embedding_ranks=get_embedding_ranks)


if __name__ == "__main__":
    main()
