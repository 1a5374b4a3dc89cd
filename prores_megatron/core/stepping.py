"""Setting alpha on a built model, and the guard that every global layer 1..L gets it exactly once.

Contract: ``set_prores_step(model, step)`` (model: a module, a DDP/Float16-wrapped module, or the list
of virtual-pipeline chunks) writes alpha(l, step) into every ProRes residual of every decoder layer,
from the layer's global ``layer_number``, its ``config.num_layers`` and the schedule/T its spec
carries. It is idempotent and cheap (a host loop over this rank's layers, no communication), except
for its first call on a model, which runs the coverage guard: a collective over the
pipeline-parallel group. Make that first call on every rank outside ``forward_backward_func`` (the
Megatron-LM entry point does it right after the model is built); a pipeline stage waiting for
activations could otherwise deadlock against it.

``model_alphas(model, num_layers)`` reads alpha per global layer back from the model's buffers (what
the kernels use), gathered over the pipeline group: a collective when PP > 1, so every rank of the
group must call it at the same point.
"""

import torch

from . import compat
from .pipeline_flags import PIPELINE_FLAGS
from .residual_scale import DepthScaledNorm, ProResBiasDropoutAdd
from .schedules import alpha


class ProResCoverageError(RuntimeError):
    """The built decoder layers are not exactly the global layers 1..L."""


def _chunks(model):
    return list(model) if isinstance(model, (list, tuple)) else [model]


def residual_scales(layer):
    """[(field, module)]: the ProRes residuals a layer holds, from its residual-add fields."""
    return [
        (field, module)
        for field in compat.BDA_FIELDS
        if isinstance(module := getattr(layer, field, None), ProResBiasDropoutAdd)
    ]


def prores_layers(model):
    """[(layer, [ProResBiasDropoutAdd, ...])] for this rank's decoder layers, in build order.

    Raises if the model has decoder layers without ProRes (a stock spec would be a silent no-op).
    """
    found = []
    for chunk in _chunks(model):
        for layer in compat.decoder_layers(chunk):
            scales = [module for _, module in residual_scales(layer)]
            if not scales:
                raise ValueError(
                    f"decoder layer {getattr(layer, 'layer_number', '?')} has no ProRes residual "
                    "scale: build the model with prores_megatron.get_prores_layer_spec(...) or "
                    "with_prores(your_spec); ProRes on a stock layer would silently do nothing"
                )
            found.append((layer, scales))
    return found


def _pp_group_of(model):
    for chunk in _chunks(model):
        for layer in compat.decoder_layers(chunk):
            group = getattr(getattr(layer, "pg_collection", None), "pp", None)
            if group is not None:
                return group
    return compat.default_pp_group()


def check_prores_coverage(model, pp_group=None):
    """Collective over the pipeline group: the union of built layers must be exactly 1..L, once each.

    Every rank of the group must call it. Local problems (a stock layer) are gathered first and
    raised on every rank, so no stage is left waiting. Returns the sorted global layer list.
    """
    try:
        layers = prores_layers(model)
        local = ([layer.layer_number for layer, _ in layers],
                 sorted({layer.config.num_layers for layer, _ in layers}), None)
    except ValueError as err:
        local = ([], [], str(err))
    if pp_group is None:
        pp_group = _pp_group_of(model)
    gathered = [local]
    if (
        pp_group is not None
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size(pp_group) > 1
    ):
        gathered = [None] * torch.distributed.get_world_size(pp_group)
        torch.distributed.all_gather_object(gathered, local, group=pp_group)
    errors = [f"pipeline stage {i}: {err}" for i, (_, _, err) in enumerate(gathered) if err]
    if errors:
        raise ValueError("; ".join(errors))
    all_layers = sorted(n for numbers, _, _ in gathered for n in numbers)
    all_L = sorted({L for _, Ls, _ in gathered for L in Ls})
    if not all_layers:
        raise ValueError(
            "set_prores_step: the model has no decoder layers, so there is nothing for ProRes to "
            "scale; build it with prores_megatron.get_prores_layer_spec(...) or with_prores(spec)"
        )
    if len(all_L) != 1:
        raise ProResCoverageError(
            f"pipeline stages disagree on config.num_layers ({all_L}); check --num-layers"
        )
    L = all_L[0]
    expected = list(range(1, L + 1))
    if all_layers != expected:
        missing = sorted(set(expected) - set(all_layers))
        extra = sorted({n for n in all_layers if all_layers.count(n) > 1 or not 1 <= n <= L})
        per_stage = "; ".join(f"stage {i}: {numbers}" for i, (numbers, _, _) in enumerate(gathered))
        raise ProResCoverageError(
            f"ProRes needs every global layer 1..{L} built exactly once across pipeline stages, "
            f"but {len(all_layers)} layer(s) were built (missing {missing or 'none'}, duplicated "
            f"or out of range {extra or 'none'}; {per_stage}). The pipeline layout silently "
            f"changed the model's depth: check {', '.join(PIPELINE_FLAGS)}."
        )
    return all_layers


def set_prores_step(model, step: int, check_coverage: bool = True) -> None:
    """Write alpha(l, step) into every ProRes layer of ``model`` (see module docstring)."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "set_prores_step was called while a CUDA graph is being captured: the alpha it writes "
            "would be frozen at the capture step on every replay. Set alpha once per iteration before "
            "the captured region (the Megatron-LM integration wraps train_step for this)"
        )
    chunks = _chunks(model)
    if check_coverage and not all(getattr(c, "_prores_coverage_checked", False) for c in chunks):
        check_prores_coverage(chunks)
        for chunk in chunks:
            chunk._prores_coverage_checked = True
    for chunk in chunks:
        # The forward step calls this for every micro-batch: after the first, nothing to do.
        if getattr(chunk, "_prores_step", None) == step:
            continue
        for layer, scales in prores_layers(chunk):
            L = layer.config.num_layers
            for norm in (getattr(layer, "input_layernorm", None), getattr(layer, "pre_mlp_layernorm", None)):
                if isinstance(norm, DepthScaledNorm) and norm.layer_number != layer.layer_number:
                    norm.bind_layer(layer.layer_number)
            graphs = getattr(layer.config, "cuda_graph_impl", "none") not in (None, "none")
            for scale in scales:
                scale.fast_path = not graphs
                scale.set_alpha(alpha(scale.schedule, layer.layer_number, step, scale.warmup_steps, L))
        chunk._prores_step = step


def model_alphas(model, num_layers: int, pp_group=None) -> list:
    """Alpha of global layers 1..num_layers as this model's buffers hold it (see module docstring)."""
    layers = prores_layers(model)
    device = layers[0][1][0].alpha.device if layers else torch.device("cpu")
    table = torch.full((num_layers,), -1.0, dtype=torch.float64, device=device)
    for layer, scales in layers:
        table[layer.layer_number - 1] = scales[0].alpha.double()  # both branches share the layer's alpha
    if pp_group is None:
        pp_group = _pp_group_of(model)
    if (pp_group is not None and torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size(pp_group) > 1):
        torch.distributed.all_reduce(table, op=torch.distributed.ReduceOp.MAX, group=pp_group)
    missing = [l + 1 for l in range(num_layers) if table[l] < 0]
    if missing:
        raise ProResCoverageError(f"model_alphas: no stage holds layer(s) {missing} of 1..{num_layers}")
    return table.tolist()
