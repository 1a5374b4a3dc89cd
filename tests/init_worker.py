"""torchrun worker: build a tiny GPT under tensor or expert parallelism, apply each init, dump FULL weights.

Usage: torchrun --nproc_per_node N tests/init_worker.py OUT.pt [tp|ep]
Rank 0 writes {scheme: {global param name: full tensor}}.
- tp (default): a dense model over N tensor-parallel ranks; TP shards are gathered and SwiGLU's
  per-rank [gate_r; up_r] halves reassembled into the global [gate; up], so a world-size-1 dump and
  a TP2 dump of the same scheme must be equal. 'megatron' is megatron-core's own init with
  use_cpu_initialization (its TP-invariant path).
- ep: an MoE model (4 routed experts, top-2, a shared expert) over N expert-parallel ranks; each
  rank's local experts are gathered and named by their global expert id
  (``...mlp.experts.<id>.linear_fc1.weight``), so an EP1 dump and an EP2 dump must be equal.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prores_megatron.training.cpu_shim import install_cpu_shim  # noqa: E402

SCHEMES = ["megatron", "plain", "scaled", "ds", "deepnorm"]


def full_weights(model, tp_size, gated):
    out = {}
    group = None
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    for name, p in model.named_parameters():
        t = p.detach()
        if getattr(p, "tensor_model_parallel", False) and tp_size > 1:
            parts = [torch.empty_like(t) for _ in range(tp_size)]
            torch.distributed.all_gather(parts, t.contiguous(), group=group)
            if gated and name.endswith("mlp.linear_fc1.weight"):
                halves = [part.chunk(2, 0) for part in parts]
                t = torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)
            else:
                t = torch.cat(parts, dim=p.partition_dim)
        out[name] = t.clone()
    return out


def expert_weights(model, ep_size):
    """Dense parameters as they are; routed experts gathered over EP and renamed by global id."""
    import re

    from megatron.core import parallel_state

    group = parallel_state.get_expert_model_parallel_group()
    out = {}
    for name, p in model.named_parameters():
        m = re.match(r"^(.*\.mlp\.experts)\.local_experts\.(\d+)\.(.*)$", name)
        if not m:
            out[name] = p.detach().clone()
            continue
        local = len({k for k, _ in model.named_parameters() if k.startswith(m.group(1) + ".local_experts.")
                     and k.endswith("." + m.group(3))})
        parts = [torch.empty_like(p) for _ in range(ep_size)]
        torch.distributed.all_gather(parts, p.detach().contiguous(), group=group)
        for rank, part in enumerate(parts):
            out[f"{m.group(1)}.{rank * local + int(m.group(2))}.{m.group(3)}"] = part.clone()
    return out


def main_ep():
    """The ep mode (see module docstring)."""
    install_cpu_shim(training=False)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from prores_megatron import get_prores_layer_spec
    from prores_megatron.core.init_schemes import apply_init

    from models import gpt_model, llama_config

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    ws = torch.distributed.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=ws)
    dumps = {}
    for scheme in SCHEMES:
        model_parallel_cuda_manual_seed(7, force_reset_rng=True)
        torch.manual_seed(7)
        cfg = llama_config(num_layers=4, hidden=64, heads=4, groups=2, ffn=96, init_method_std=0.02,
                           num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48,
                           moe_shared_expert_intermediate_size=64, expert_model_parallel_size=ws,
                           use_cpu_initialization=True)
        spec = get_prores_layer_spec("local", warmup_steps=1.0, num_experts=4)
        model = gpt_model(cfg, spec, vocab=128, seq=16)
        apply_init(model, scheme, sigma=0.02, seed=11)
        dumps[scheme] = expert_weights(model, ws)
    if torch.distributed.get_rank() == 0:
        torch.save(dumps, sys.argv[1])
    torch.distributed.destroy_process_group()


def main():
    if len(sys.argv) > 2 and sys.argv[2] == "ep":
        return main_ep()
    install_cpu_shim(training=False)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from prores_megatron import get_prores_layer_spec
    from prores_megatron.core.init_schemes import apply_init

    from models import gpt_model, llama_config

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    ws = torch.distributed.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=ws)
    dumps = {}
    for scheme in SCHEMES:
        model_parallel_cuda_manual_seed(7, force_reset_rng=True)
        torch.manual_seed(7)
        cfg = llama_config(num_layers=4, hidden=64, heads=4, groups=2, ffn=96, init_method_std=0.02,
                           tensor_model_parallel_size=ws, use_cpu_initialization=True)
        model = gpt_model(cfg, get_prores_layer_spec("local", warmup_steps=1.0), vocab=128, seq=16)
        apply_init(model, scheme, sigma=0.02, seed=11)
        dumps[scheme] = full_weights(model, ws, gated=True)
    if torch.distributed.get_rank() == 0:
        torch.save(dumps, sys.argv[1])
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
