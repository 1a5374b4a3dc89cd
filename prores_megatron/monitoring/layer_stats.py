"""Depth-stability statistics per decoder layer, recorded by the ProRes residual modules.

Contract:
- ``LayerMonitor(model_chunks)``: ``start()`` arms every ProRes residual of this rank's layers;
  the next training forward passes accumulate, per layer, the sum of squares and element count of
  the attention and MLP branch outputs before alpha (what alpha multiplies), of the layer output
  (the residual stream x_{l+1}), and the sum of per-token L2 norms of that output; at ``start()``
  it also reads each layer's alpha from the residual module's buffer (the value the kernel
  multiplies by), so the log shows the model's alpha, not a recomputation. ``stop()``
  disarms them; ``reduce(...)`` returns one [L, k] table valid on every rank: summed over
  data-parallel replicas, over pipeline stages (each layer lives on one), and over tensor-parallel
  ranks only under sequence parallelism (otherwise TP ranks hold the same activations).
  ``layer_grad_sq(...)`` gives the per-layer sum of squared gradients the same way;
  ``layer_grad_sq_sharded(...)`` the same under the distributed optimizer, from each rank's shard.
- ``capture_branch_outputs(model)``: a context manager that keeps the raw branch outputs and
  layer outputs of one forward pass (for offline analysis such as the layerwise cosine).
Disarmed, the residual modules pay one attribute test per call. Recompute passes inside backward
are not counted (they repeat a forward already counted).
"""

import contextlib
import math

import torch

from ..core import compat
from ..core.stepping import residual_scales

# Columns of the per-layer accumulator. ALPHA holds alpha once per rank that holds the layer and
# ALPHA_N counts those ranks, so the reduced table gives alpha = ALPHA / ALPHA_N exactly.
ATTN_SQ, ATTN_N, MLP_SQ, MLP_N, OUT_SQ, OUT_N, OUT_TOKNORM, OUT_TOKENS, ALPHA, ALPHA_N = range(10)
_WIDTH = 10


def _in_backward() -> bool:
    # Full/selective recompute re-runs forwards from inside autograd's backward pass.
    return torch._C._current_graph_task_id() != -1


class _Recorder:
    """Attached to one residual module: adds its tensors to the layer's accumulator row."""

    def __init__(self, acc, role, keep=None):
        self.acc, self.role, self.keep = acc, role, keep

    def branch(self, x, bias):
        if _in_backward():
            return
        y = (x if bias is None else x + bias).detach()
        if self.keep is not None:
            self.keep[self.role] = y.clone()
        if self.acc is not None:
            col = ATTN_SQ if self.role == "attn" else MLP_SQ
            self.acc[col] += y.float().pow(2).sum().double()
            self.acc[col + 1] += y.numel()

    def output(self, out):
        if self.role != "mlp" or _in_backward():
            return  # the MLP residual's output is the layer's output
        y = out.detach()
        if self.keep is not None:
            self.keep["out"] = y.clone()
        if self.acc is not None:
            y = y.float()
            self.acc[OUT_SQ] += y.pow(2).sum().double()
            self.acc[OUT_N] += y.numel()
            self.acc[OUT_TOKNORM] += y.norm(dim=-1).sum().double()
            self.acc[OUT_TOKENS] += y.numel() // y.shape[-1]


_ROLES = {"self_attn_bda": "attn", "mlp_bda": "mlp"}


def _residuals(layer):
    return [(_ROLES[field], module) for field, module in residual_scales(layer) if field in _ROLES]


def _layers(model_chunks):
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    return [layer for chunk in chunks for layer in compat.decoder_layers(chunk)]


class LayerMonitor:
    """Per-layer activation statistics of this rank's layers (see module docstring)."""

    def __init__(self, model_chunks):
        self.layers = _layers(model_chunks)
        if not self.layers or not all(_residuals(layer) for layer in self.layers):
            raise ValueError("LayerMonitor needs decoder layers built with the ProRes spec")
        self.acc = {}

    def start(self, in_eval: bool = False):
        """Arm the recorders; ``in_eval`` also records forwards in eval mode (offline analysis)."""
        self.acc = {}
        for layer in self.layers:
            device = next(layer.parameters()).device
            row = torch.zeros(_WIDTH, dtype=torch.float64, device=device)
            self.acc[layer.layer_number] = row
            residuals = _residuals(layer)
            row[ALPHA] = residuals[0][1].alpha.double()  # both branches share the layer's alpha
            row[ALPHA_N] = 1.0
            for role, module in residuals:
                module.recorder = _Recorder(row, role)
                module.record_in_eval = in_eval

    def stop(self):
        for layer in self.layers:
            for _, module in _residuals(layer):
                module.recorder = None
                module.record_in_eval = False
        return self.acc

    def reduce(self, num_layers, dp_group=None, pp_group=None, tp_group=None, sequence_parallel=False):
        """[L, 10] float64 table (row l-1 = layer l), identical on every rank that calls it."""
        device = next(iter(self.acc.values())).device if self.acc else torch.device("cpu")
        table = torch.zeros(num_layers, _WIDTH, dtype=torch.float64, device=device)
        for l, row in self.acc.items():
            table[l - 1] += row
        for group, wanted in ((dp_group, True), (tp_group, sequence_parallel), (pp_group, True)):
            if wanted and group is not None and torch.distributed.get_world_size(group) > 1:
                torch.distributed.all_reduce(table, group=group)
        return table


def summarize(table):
    """Per-layer lists from a reduced table: attention/MLP branch RMS, output RMS and token norm,
    and alpha as the model held it."""

    def ratio(num, den, root):
        return [math.sqrt(n / d) if root and d else (n / d if d else float("nan")) for n, d in zip(num, den)]

    t = table.tolist()
    col = lambda c: [row[c] for row in t]
    return {
        "attn_rms": ratio(col(ATTN_SQ), col(ATTN_N), True),
        "mlp_rms": ratio(col(MLP_SQ), col(MLP_N), True),
        "resid_rms": ratio(col(OUT_SQ), col(OUT_N), True),
        "resid_norm": ratio(col(OUT_TOKNORM), col(OUT_TOKENS), False),
        "alpha": ratio(col(ALPHA), col(ALPHA_N), False),
    }


def _sum_over_tp_and_pp(sharded, replicated, tp_group, pp_group):
    """Per-layer totals: tensor-parallel shards summed over TP (replicated parameters count once),
    then over pipeline stages (each layer lives on one)."""
    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        torch.distributed.all_reduce(sharded, group=tp_group)
    total = sharded + replicated
    if pp_group is not None and torch.distributed.get_world_size(pp_group) > 1:
        torch.distributed.all_reduce(total, group=pp_group)
    return total


def layer_grad_sq(model_chunks, num_layers, pp_group=None, tp_group=None):
    """Per-layer sum of squared gradients over the layer's parameters, as a [L] float64 tensor.

    Reads ``main_grad`` (Megatron DDP) or ``grad``. Tensor-parallel shards are summed over the TP
    group; replicated parameters (norms) count once. Call after the data-parallel reduction.
    """
    layers = _layers(model_chunks)
    device = next(layers[0].parameters()).device if layers else torch.device("cpu")
    sharded = torch.zeros(num_layers, dtype=torch.float64, device=device)
    replicated = torch.zeros(num_layers, dtype=torch.float64, device=device)
    for layer in layers:
        for p in layer.parameters():
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
            if g is None:
                continue
            sq = g.detach().float().pow(2).sum().double()
            if getattr(p, "tensor_model_parallel", False):
                sharded[layer.layer_number - 1] += sq
            else:
                replicated[layer.layer_number - 1] += sq
    return _sum_over_tp_and_pp(sharded, replicated, tp_group, pp_group)


def layer_grad_sq_sharded(model_chunks, num_layers, pp_group=None, tp_group=None):
    """``layer_grad_sq`` under the distributed optimizer: after its reduce-scatter each rank holds
    the reduced gradient only in its own shard of every gradient bucket, so each rank sums the squares
    of the part of each layer parameter's ``main_grad`` inside its shard, and the sums are
    all-reduced over the bucket group's distributed-optimizer group, as megatron-core's
    ``get_grad_norm_fp32`` does with each rank's shard for clipping; then TP and PP as in
    ``layer_grad_sq``. ``model_chunks``: the DDP-wrapped chunks (their ``bucket_groups``)."""
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    layer_of = {}
    for layer in _layers(chunks):
        for p in layer.parameters():
            layer_of[id(p)] = (layer.layer_number - 1, bool(getattr(p, "tensor_model_parallel", False)))
    device = next(iter(chunks[0].parameters())).device
    per_group = {}  # id(group) -> (group, [L] sharded, [L] replicated)
    for chunk in chunks:
        groups = [*getattr(chunk, "bucket_groups", []), *getattr(chunk, "expert_parallel_bucket_groups", [])]
        if not groups:
            raise ValueError("layer_grad_sq_sharded needs Megatron DDP chunks with gradient buckets")
        for bucket_group in groups:
            size = bucket_group.intra_distributed_optimizer_instance_size
            rank = bucket_group.intra_distributed_optimizer_instance_rank
            group = bucket_group.intra_distributed_optimizer_instance_group
            _, sharded, replicated = per_group.setdefault(id(group), (
                group, torch.zeros(num_layers, dtype=torch.float64, device=device),
                torch.zeros(num_layers, dtype=torch.float64, device=device)))
            for bucket in bucket_group.buckets:
                shard = bucket.grad_data.numel() // size
                lo, hi = rank * shard, (rank + 1) * shard
                for param, (start, end) in bucket.param_to_index.items():
                    where = layer_of.get(id(param))
                    a, b = max(start, lo), min(end, hi)
                    if where is None or a >= b:
                        continue
                    sq = bucket.grad_data[a:b].detach().float().pow(2).sum().double()
                    (sharded if where[1] else replicated)[where[0]] += sq
    sharded = torch.zeros(num_layers, dtype=torch.float64, device=device)
    replicated = torch.zeros(num_layers, dtype=torch.float64, device=device)
    for group, s_part, r_part in per_group.values():
        both = torch.stack([s_part, r_part])
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(both, group=group)
        sharded += both[0]
        replicated += both[1]
    return _sum_over_tp_and_pp(sharded, replicated, tp_group, pp_group)


class _Capture:
    def __init__(self):
        self.branch, self.output = {}, {}


@contextlib.contextmanager
def capture_branch_outputs(model_chunks):
    """Keep one forward's raw branch outputs (``cap.branch[l]['attn'|'mlp']``, before alpha) and
    layer outputs (``cap.output[l]``), keyed by global layer number. Works in eval mode too."""
    cap = _Capture()
    layers = _layers(model_chunks)
    try:
        for layer in layers:
            keep = {}
            cap.branch[layer.layer_number] = keep
            for role, module in _residuals(layer):
                module.recorder = _Recorder(None, role, keep=keep)
                module.record_in_eval = True
        yield cap
    finally:
        for layer in layers:
            for _, module in _residuals(layer):
                module.recorder = None
                module.record_in_eval = False
        for l, keep in cap.branch.items():
            if "out" in keep:
                cap.output[l] = keep.pop("out")
