"""The paper's depth-dependent initialisations, applied to a built megatron-core GPT model.

Contract: ``apply_init(model_chunks, scheme, sigma, seed)`` re-draws every weight of the model for
``scheme`` (docs/method.md §6; stds from ``depth_scaling``):

    megatron  leave megatron-core's own init alone (normal sigma; output layers sigma/sqrt(2L))
    plain     truncated N(0, sigma^2) at +-3 std, every weight
    scaled    as plain, attention-output and MLP-down projections sigma/sqrt(2L)
    ds        as plain, those of layer l sigma/sqrt(2l)
    deepnorm  Xavier-normal, gain (8L)^(-1/4) on v, attention-output and every MLP projection,
              gain 1 on q and k; embedding and output layer as plain

Norm weights and biases keep megatron-core's init (ones / zeros). Each weight is drawn whole, in its
global layout, from a generator seeded by (seed, global layer, name), and this rank then keeps its
tensor-parallel slice: every TP/PP/VPP split holds exactly the same model, bit for bit.

MoE: routed experts are keyed by their global expert id (``mlp.experts.<id>.linear_fc1.weight``,
whichever module holds them: SequentialMLP's ``local_experts.<i>`` or TE's grouped ``weight<i>``),
so every expert-parallel layout draws the same experts, and each is sliced over the expert
tensor-parallel group. Expert and shared-expert down-projections are output projections
(depth-scaled like ``linear_fc2``); the router is drawn like the embedding (truncated N(0, sigma^2)).
A weight no rule covers is refused, naming it, rather than left at megatron-core's init.
"""

import hashlib
import re

import torch

from . import compat
from .depth_scaling import INITS, deepnorm_init_gain, output_projection_std, xavier_std

# Decoder-layer weights by role; routed experts are matched by the patterns and renamed to their
# global expert id.
_ROLES = {
    "self_attention.linear_qkv.weight": "qkv",
    "self_attention.linear_proj.weight": "out",
    "mlp.linear_fc1.weight": "fc1",
    "mlp.linear_fc2.weight": "out",
    "mlp.shared_experts.linear_fc1.weight": "fc1",
    "mlp.shared_experts.linear_fc2.weight": "out",
    "mlp.router.weight": "router",
}
_EXPERT_SEQUENTIAL = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")
_EXPERT_GROUPED = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")
_FC_ROLE = {"linear_fc1": "fc1", "linear_fc2": "out"}


def check_init(scheme: str) -> str:
    if scheme not in INITS:
        raise ValueError(f"init scheme={scheme!r} is unknown; valid choices: {', '.join(INITS)}")
    return scheme


def _generator(seed: int, key: str, device) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _trunc_normal(shape, std, g, device):
    out = torch.empty(shape, dtype=torch.float32, device=device)
    return torch.nn.init.trunc_normal_(out, 0.0, std, -3.0 * std, 3.0 * std, generator=g)


def _normal(shape, std, g, device):
    return torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=g)


def _role_and_key(name, first_local_expert):
    """(role, generator key) of a decoder-layer weight; routed experts get their global id."""
    if name in _ROLES:
        return _ROLES[name], name
    m = _EXPERT_SEQUENTIAL.match(name)
    if m:
        local, fc = int(m.group(1)), m.group(2)
    else:
        m = _EXPERT_GROUPED.match(name)
        if not m:
            return None, name
        fc, local = m.group(1), int(m.group(2))
    return _FC_ROLE[fc], f"mlp.experts.{first_local_expert + local}.{fc}.weight"


def _full_layer_weight(scheme, role, name, shape, config, layer, sigma, g, device):
    """The global (unsharded) value of one decoder-layer weight."""
    L = config.num_layers
    if role is None:
        raise ValueError(f"--prores-init {scheme}: no rule for decoder weight {name!r} (shape {tuple(shape)}); "
                         "use --prores-init megatron for this model")
    if role == "router" or scheme != "deepnorm":
        std = output_projection_std(scheme, sigma, layer, L) if role == "out" else sigma
        return _trunc_normal(shape, std, g, device)
    beta = deepnorm_init_gain(L)
    H = config.hidden_size
    if role == "qkv":
        nh, ng, d = config.num_attention_heads, config.num_query_groups or config.num_attention_heads, config.kv_channels
        hpg = nh // ng
        w = torch.empty(ng, hpg + 2, d, H, dtype=torch.float32, device=device)
        w[:, :hpg] = _normal((ng, hpg, d, H), xavier_std(H, nh * d), g, device)  # q_proj, gain 1
        w[:, hpg] = _normal((ng, d, H), xavier_std(H, ng * d), g, device)  # k_proj, gain 1
        w[:, hpg + 1] = _normal((ng, d, H), xavier_std(H, ng * d, beta), g, device)  # v_proj
        return w.reshape(shape)
    if role == "fc1":  # [gate; up], each its own [F, H] projection
        F = shape[0] // 2 if config.gated_linear_unit else shape[0]
        return _normal(shape, xavier_std(H, F, beta), g, device)
    return _normal(shape, xavier_std(shape[1], shape[0], beta), g, device)  # attention-output, MLP-down


def _shard(full, param, tp_rank, tp_size, gated=False):
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim = param.partition_dim
    if gated:
        # SwiGLU: global [gate; up], but each TP shard holds [gate_r; up_r].
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], 0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def _global_shape(param, tp_size):
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
        shape[param.partition_dim] *= tp_size
    return shape


def _first_local_expert(layer) -> int:
    """Global id of this rank's first routed expert of ``layer`` (0 without MoE or EP)."""
    experts = getattr(getattr(layer, "mlp", None), "experts", None)
    if experts is None:
        return 0
    local = experts.num_local_experts
    return compat.parallel_state.get_expert_model_parallel_rank() * local


def _tp_of(param, tp_size, tp_rank, etp_size, etp_rank):
    """(size, rank) of the tensor-parallel group that shards ``param``: the expert-TP group for
    routed experts (megatron-core marks them ``allreduce=False``), the TP group otherwise."""
    return (etp_size, etp_rank) if getattr(param, "allreduce", True) is False else (tp_size, tp_rank)


def apply_init(model_chunks, scheme: str, sigma: float = 0.02, seed: int = 1234) -> None:
    """Re-initialise ``model_chunks`` (module, wrapped module or list) in place; see module docstring."""
    if check_init(scheme) == "megatron":
        return
    parallel_state = compat.parallel_state
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    etp_size = parallel_state.get_expert_tensor_parallel_world_size()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    with torch.no_grad():
        for chunk in chunks:
            layers = compat.decoder_layers(chunk)
            if layers:
                cfg = layers[0].config
                ng = cfg.num_query_groups or cfg.num_attention_heads
                if tp_size > ng:
                    raise ValueError(
                        f"--prores-init {scheme} with --tensor-model-parallel-size {tp_size} > "
                        f"--num-query-groups {ng} (replicated KV heads) is not supported"
                    )
            in_layers = set()
            for layer in layers:
                first_expert = _first_local_expert(layer)
                for name, p in layer.named_parameters():
                    in_layers.add(id(p))
                    if "norm" in name or not (name.endswith("weight") or _EXPERT_GROUPED.match(name)):
                        continue  # norms and biases keep megatron-core's ones / zeros
                    role, key = _role_and_key(name, first_expert)
                    size, rank = _tp_of(p, tp_size, tp_rank, etp_size, etp_rank)
                    g = _generator(seed, f"layer{layer.layer_number}.{key}", p.device)
                    full = _full_layer_weight(
                        scheme, role, name, _global_shape(p, size), layer.config, layer.layer_number, sigma, g,
                        p.device,
                    )
                    gated = role == "fc1" and layer.config.gated_linear_unit
                    p.copy_(_shard(full, p, rank, size, gated))
            inner = compat.unwrap(chunk)
            for name, p in inner.named_parameters():
                if id(p) in in_layers or not name.endswith("weight") or "norm" in name:
                    continue
                # Embedding, output layer (and learned positions): truncated N(0, sigma^2). A tied
                # output layer on the last stage is the embedding's copy: draw it the same way.
                key = "embedding.word_embeddings.weight" if getattr(p, "shared_embedding", False) else name
                g = _generator(seed, key, p.device)
                full = _trunc_normal(_global_shape(p, tp_size), sigma, g, p.device)
                p.copy_(_shard(full, p, tp_rank, tp_size))
