"""A training run's GPT model at world size 1, with a saved checkpoint's weights, for analysis.

Contract:
- ``init_world1(device, seed)``: a one-process group (gloo on CPU, NCCL on CUDA) and megatron-core
  model parallelism 1 x 1; installs the CPU shim first when CUDA is unavailable. Idempotent.
- ``build_model(args, device)``: the run's model from its saved Megatron arguments, built the way
  the training entry point builds it (``gpt_config_from_args`` + the ProRes layer spec of
  ``training.model_config`` + megatron-core's ``GPTModelBuilder``), but unsplit (TP = PP = 1) and without a
  weight initialisation (the weights come from a checkpoint). On CPU it uses the local (torch)
  layers and no CUDA fusions; a Transformer Engine checkpoint loads into them (same tensor names).
  A run without ProRes flags gets schedule ``none`` (alpha = 1), i.e. the plain model.
- ``load_weights(model, iteration_dir)``: megatron-core ``dist_checkpointing.load`` of the model
  tensors (any TP/PP layout of the saved run), strict, under ``checkpoint.restricted_dcp_loading``
  (megatron-core would unpickle ``.metadata`` and pickled entries without restriction): a
  checkpoint whose pickles name a class outside the allow-list raises ``UnsafePickleError``.
Megatron imports stay inside the functions (after the shim).
"""

import copy

from ..utils import free_port

# Layout and fusion settings that only make sense on the training cluster.
_UNSPLIT = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=1,
                expert_model_parallel_size=1, expert_tensor_parallel_size=1,
                virtual_pipeline_model_parallel_size=None, num_layers_per_virtual_pipeline_stage=None,
                num_virtual_stages_per_pipeline_rank=None, pipeline_model_parallel_layout=None,
                decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
                sequence_parallel=False, tp_comm_overlap=False)
_CPU = dict(transformer_impl="local", use_cpu_initialization=True, fp8=None, bias_dropout_fusion=False,
            apply_rope_fusion=False, masked_softmax_fusion=False, bias_swiglu_fusion=False,
            bias_gelu_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False)
_NO_PRORES = dict(prores_schedule="none", prores_warmup_steps=None, prores_arch="pre")


def init_world1(device: str, seed: int = 1234) -> None:
    import torch

    if device == "cpu":
        from ..training.cpu_shim import install_cpu_shim

        install_cpu_shim()
    else:
        torch.cuda.set_device(0)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo" if device == "cpu" else "nccl", rank=0, world_size=1,
                                             init_method=f"tcp://127.0.0.1:{free_port()}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(seed)


def build_model(saved_args, device: str):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.argument_utils import gpt_config_from_args

    from ..training.model_config import prores_layer_spec_fn

    args = copy.copy(saved_args)
    for name, value in {**_UNSPLIT, **(_CPU if device == "cpu" else {})}.items():
        setattr(args, name, value)
    if getattr(args, "prores_schedule", None) is None:  # a run without ProRes: the plain model
        for name, value in _NO_PRORES.items():
            setattr(args, name, value)
    model_cfg = gpt_config_from_args(args)
    model_cfg.transformer.perform_initialization = False  # every weight is loaded afterwards
    model_cfg.transformer_layer_spec = prores_layer_spec_fn(args)
    builder = model_cfg.get_builder_cls()(model_cfg)
    model = builder.build_model(ProcessGroupCollection.use_mpu_process_groups(), pre_process=True, post_process=True)
    return model.to(device).eval()


def load_weights(model, iteration_dir) -> None:
    from megatron.core import dist_checkpointing

    from ..checkpoint.safe_unpickle import restricted_dcp_loading

    directory = str(iteration_dir)
    with restricted_dcp_loading(directory):
        metadata = dist_checkpointing.load_content_metadata(directory)
        request = model.sharded_state_dict(metadata=metadata)
        loaded = dist_checkpointing.load(request, directory)
    # load() also returns the checkpoint's common entries (args, iteration, ...): keep the model's.
    model.load_state_dict({k: v for k, v in loaded.items() if k in request}, strict=True)
