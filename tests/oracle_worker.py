"""torchrun worker for the deterministic cross-layout oracle (docs/megatron.md §5).

One process per rank runs a list of parallel configs one after the other (model-parallel groups are
re-initialised between configs). For every config it builds a tiny Llama-style GPTModel (RMSNorm,
SwiGLU, RoPE, GQA, no biases, untied embeddings, fp32, dropout 0) for each virtual-pipeline chunk,
writes weights that depend only on (GLOBAL layer number, parameter name), so every TP/PP/VPP split
holds exactly the same model, sets alpha with ``prores_megatron.set_prores_step`` and runs
megatron-core's ``get_forward_backward_func()`` on identical batches. Rank 0 gathers the mean loss,
the per-micro-batch losses, per-GLOBAL-layer sums of grad^2 and the alpha each layer received, and
writes one JSON file keyed by config name.

megatron-core only: this file never imports ``megatron.training``.

Usage (see tests/test_cross_layout_oracle.py):
    python -m torch.distributed.run --nproc_per_node N --master_port P tests/oracle_worker.py \
        --configs CONFIGS.json --out RESULT.json

CONFIGS.json is a list of objects: {"name", "tp", "pp", "vpp" (or null), "first", "last" (uneven PP),
"layout" (pipeline_model_parallel_layout string), "recompute" (bool), "vanilla" (bool: also run the
stock megatron-core local spec)}. tp * pp must equal the world size (no data parallelism).
"""

import argparse
import hashlib
import json
import os
import re
import sys
import time

import torch
import torch.nn.functional as F

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)  # prores_megatron, when run as a script by torchrun

from prores_megatron.training.cpu_shim import install_cpu_shim  # noqa: E402

# Model / data constants (docs/megatron.md §5 oracle model, plus SwiGLU + GQA).
NUM_LAYERS = 8
HIDDEN = 64
FFN = 128
HEADS = 4
QUERY_GROUPS = 2
VOCAB = 128
SEQ = 32
MBS = 2
NUM_MICROBATCHES = 4
DATA_SEED = 1234

# The ProRes cases run on every config: (case name, schedule, warmup_steps, step, model key).
# linear, T=1, t=4:       alpha = 1, 1, 1, 1, .8, .667, .571, .5
# stagewise-0, T=2, t=9:  alpha = 1, 1, 1, 1, .5, 0, 0, 0
# stagewise-0, T=2, t=16: alpha = 1 everywhere (same model, alpha rewritten in place)
PRORES_CASES = [
    ("linear", "linear", 1.0, 4, "linear"),
    ("stagewise", "stagewise-0", 2.0, 9, "stagewise"),
    ("stagewise_alpha1", "stagewise-0", 2.0, 16, "stagewise"),
]

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _seed_of(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _full_value(key: str, shape, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(_seed_of(key))
    x = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    if kind == "norm":
        return 1.0 + 0.1 * x
    if kind == "embedding":
        return 0.5 * x
    return 0.08 * x


def _param_key(chunk, name):
    """(key, global layer number or None, name inside the layer or the model)."""
    m = _LAYER_RE.match(name)
    if m:
        layer = chunk.decoder.layers[int(m.group(1))]
        return f"layer{layer.layer_number}.{m.group(2)}", layer.layer_number, m.group(2)
    return name, None, name


def set_deterministic_weights(chunks, tp_size, tp_rank):
    """Weights keyed by GLOBAL layer + name: every split holds exactly the world-1 model."""
    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                key, _, local = _param_key(chunk, name)
                kind = "norm" if "norm" in local else ("embedding" if "word_embeddings" in local else "linear")
                if getattr(p, "tensor_model_parallel", False) and tp_size > 1:
                    dim = p.partition_dim
                    full_shape = list(p.shape)
                    full_shape[dim] *= tp_size
                    full = _full_value(key, full_shape, kind)
                    if local.endswith("mlp.linear_fc1.weight"):
                        # SwiGLU: the global tensor is [gate; up]; each TP shard is [gate_r; up_r].
                        assert dim == 0
                        gate, up = full.chunk(2, dim=0)
                        shard = torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], 0)
                    else:
                        # QKV: plain chunk along dim 0 (rows are grouped per query group and TP
                        # divides num_query_groups); embedding/output: vocab rows; proj/fc2: dim 1.
                        shard = full.chunk(tp_size, dim=dim)[tp_rank]
                else:
                    shard = _full_value(key, p.shape, kind)
                assert shard.shape == p.shape, (name, shard.shape, p.shape)
                p.copy_(shard)


def make_batches():
    g = torch.Generator().manual_seed(DATA_SEED)
    tokens = torch.randint(0, VOCAB, (NUM_MICROBATCHES, MBS, SEQ + 1), generator=g)
    return [(tokens[i, :, :SEQ].contiguous(), tokens[i, :, 1:].contiguous()) for i in range(NUM_MICROBATCHES)]


def build_config(cfg):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(
        num_layers=NUM_LAYERS,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        num_attention_heads=HEADS,
        num_query_groups=QUERY_GROUPS,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        perform_initialization=False,  # weights are overwritten deterministically anyway
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        batch_p2p_comm=False,  # PP=2 + VPP pitfall (notes §4): batched p2p swaps tensors
        deallocate_pipeline_outputs=True,  # Megatron-LM's default
        tensor_model_parallel_size=cfg["tp"],
        pipeline_model_parallel_size=cfg["pp"],
        sequence_parallel=False,
    )
    if cfg.get("layout"):
        kw["pipeline_model_parallel_layout"] = cfg["layout"]
    elif cfg.get("vpp"):
        kw["virtual_pipeline_model_parallel_size"] = cfg["vpp"]
    if cfg.get("first") is not None:
        kw["num_layers_in_first_pipeline_stage"] = cfg["first"]
    if cfg.get("last") is not None:
        kw["num_layers_in_last_pipeline_stage"] = cfg["last"]
    if cfg.get("recompute"):
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(**kw)


def build_chunks(config, layer_spec):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    vpp = config.virtual_pipeline_model_parallel_size
    stages = list(range(vpp)) if vpp else [None]
    chunks = []
    for vp_stage in stages:
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec,
            vocab_size=VOCAB,
            max_sequence_length=SEQ,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            vp_stage=vp_stage,
        )
        chunks.append(chunk)
    return chunks


def run_fwd_bwd(chunks, config, batches):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        for p in chunk.parameters():
            p.grad = None
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ).contiguous()

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach().clone()}

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)
        out = model(tokens, position_ids, None, labels=labels)
        return out, loss_func

    # One iterator per chunk: each chunk sees micro-batches 0..N-1 in order.
    iterators = [iter(batches) for _ in chunks]
    fb = get_forward_backward_func()
    losses = fb(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=NUM_MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=MBS,
        forward_only=False,
    )
    return [float(d["lm loss"].item()) for d in losses]


def collect_grads(chunks):
    """{key: (global layer or None, name, sum of grad^2 as float64, tensor_model_parallel)}."""
    out = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            key, layer, local = _param_key(chunk, name)
            g = p.grad
            sq = 0.0 if g is None else float(g.detach().double().pow(2).sum().item())
            out[key] = (layer, local, sq, bool(getattr(p, "tensor_model_parallel", False)))
    return out


def collect_alphas(chunks):
    from prores_megatron.core.compat import decoder_layers
    from prores_megatron.core.residual_scale import ProResBiasDropoutAdd

    alphas = {}
    for chunk in chunks:
        for layer in decoder_layers(chunk):
            vals = [float(m.alpha.item()) for m in layer.modules() if isinstance(m, ProResBiasDropoutAdd)]
            alphas[layer.layer_number] = vals
    return alphas


def aggregate(per_rank, tp_size):
    """Rank-0 reduction of one case: per-GLOBAL-layer grad^2 (TP shards summed, replicated counted once)."""
    by_key = {}  # key -> {tp_rank: (layer, local, sq, is_tp)}
    loss_mbs = None
    alphas = {}
    for r in per_rank:
        for key, val in r["grads"].items():
            slot = by_key.setdefault(key, {})
            assert r["tp_rank"] not in slot, f"parameter {key} held twice by tp rank {r['tp_rank']}"
            slot[r["tp_rank"]] = val
        if r["mb_losses"]:
            if r["tp_rank"] == 0:
                loss_mbs = r["mb_losses"]
        if r["tp_rank"] == 0:
            for l, a in r["alphas"].items():
                assert l not in alphas, f"layer {l} alpha reported twice"
                alphas[l] = a
    layer_terms, other = {}, {}
    replicated_max_diff = 0.0
    for key in sorted(by_key):
        slot = by_key[key]
        assert sorted(slot) == list(range(tp_size)), f"{key}: tp ranks {sorted(slot)}"
        layer, local, _, is_tp = slot[0]
        if is_tp:
            value = sum(slot[t][2] for t in range(tp_size))
        else:
            value = slot[0][2]
            for t in range(1, tp_size):
                replicated_max_diff = max(replicated_max_diff, abs(slot[t][2] - value))
        if layer is None:
            other[key] = value
        else:
            layer_terms.setdefault(layer, []).append((local, value))
    layer_grad_sq = {
        str(l): sum(v for _, v in sorted(terms)) for l, terms in sorted(layer_terms.items())
    }
    layer_param_grad_sq = {
        str(l): {n: v for n, v in sorted(terms)} for l, terms in sorted(layer_terms.items())
    }
    return {
        "loss": None if loss_mbs is None else sum(loss_mbs) / len(loss_mbs),
        "mb_losses": loss_mbs,
        "layer_grad_sq": layer_grad_sq,
        "layer_param_grad_sq": layer_param_grad_sq,
        "other_grad_sq": other,
        "alphas": {str(l): alphas[l] for l in sorted(alphas)},
        "tp_replicated_max_abs_diff": replicated_max_diff,
    }


def run_monitor_case(cfg, config, batches, specs, tp, rank, world_size):
    """The linear case (t=4) once more with prores_megatron.monitoring.layer_stats armed; at world size 1 also a
    direct computation of the same statistics from forward hooks on the attention, MLP and layer
    modules (independent of the residual modules' recorders) and from p.grad."""
    from megatron.core import parallel_state as ps

    from prores_megatron import set_prores_step
    from prores_megatron.core.compat import decoder_layers
    from prores_megatron.monitoring.layer_stats import LayerMonitor, layer_grad_sq

    chunks = build_chunks(config, specs["linear"]())
    set_deterministic_weights(chunks, tp, ps.get_tensor_model_parallel_rank())
    set_prores_step(chunks, 4)
    direct, handles = {}, []
    if world_size == 1:
        def acc(l, col, y):
            row = direct.setdefault(l, [0.0] * 8)
            y = y.detach().double()
            if col == 4:
                row[6] += float(y.norm(dim=-1).sum())
                row[7] += y.numel() // y.shape[-1]
            row[col] += float(y.pow(2).sum())
            row[col + 1] += y.numel()

        for chunk in chunks:
            for layer in decoder_layers(chunk):
                l = layer.layer_number
                handles.append(layer.self_attention.register_forward_hook(lambda m, i, o, l=l: acc(l, 0, o[0])))
                handles.append(layer.mlp.register_forward_hook(lambda m, i, o, l=l: acc(l, 2, o[0])))
                handles.append(layer.register_forward_hook(lambda m, i, o, l=l: acc(l, 4, o[0] if isinstance(o, tuple) else o)))
    monitor = LayerMonitor(chunks)
    monitor.start()
    run_fwd_bwd(chunks, config, batches)
    monitor.stop()
    for h in handles:
        h.remove()
    table = monitor.reduce(NUM_LAYERS, dp_group=ps.get_data_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
                           tp_group=ps.get_tensor_model_parallel_group(), sequence_parallel=False)
    grad_sq = layer_grad_sq(chunks, NUM_LAYERS, pp_group=ps.get_pipeline_model_parallel_group(),
                            tp_group=ps.get_tensor_model_parallel_group())
    direct_grad = {}
    if world_size == 1:
        for chunk in chunks:
            for layer in decoder_layers(chunk):
                direct_grad[layer.layer_number] = sum(float(p.grad.double().pow(2).sum()) for p in layer.parameters())
    return {"table": table.tolist(), "grad_sq": grad_sq.tolist(),
            "direct_table": [direct[l] for l in sorted(direct)], "direct_grad_sq": [direct_grad[l] for l in sorted(direct_grad)]}


def run_config(cfg, world_size, rank, batches):
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from prores_megatron import get_prores_layer_spec, set_prores_step

    tp, pp = cfg["tp"], cfg["pp"]
    assert tp * pp == world_size, f"{cfg['name']}: tp*pp={tp * pp} != world size {world_size}"
    t0 = time.perf_counter()
    config = build_config(cfg)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=config.virtual_pipeline_model_parallel_size,
        create_gloo_process_groups=False,
    )
    try:
        model_parallel_cuda_manual_seed(1, force_reset_rng=True)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()

        models = {}
        specs = {
            "linear": lambda: get_prores_layer_spec(transformer_impl="local", schedule="linear", warmup_steps=1.0),
            "stagewise": lambda: get_prores_layer_spec(
                transformer_impl="local", schedule="stagewise-0", warmup_steps=2.0
            ),
        }
        cases = [(name, key, step) for name, _, _, step, key in PRORES_CASES]
        for arch in cfg.get("archs", []):
            # The other residual architectures (post, sandwich, deepnorm, lns), linear T=1 t=4.
            specs[f"arch_{arch}"] = lambda arch=arch: get_prores_layer_spec(
                transformer_impl="local", schedule="linear", warmup_steps=1.0, arch=arch, config=config
            )
            cases.append((f"arch_{arch}", f"arch_{arch}", 4))
        if cfg.get("vanilla"):
            specs["vanilla"] = lambda: get_gpt_layer_local_spec(normalization="RMSNorm")
            cases.append(("vanilla", "vanilla", None))

        local_layers = None
        results = {}
        for case, key, step in cases:
            if key not in models:
                models = {key: build_chunks(config, specs[key]())}  # one model alive at a time
                set_deterministic_weights(models[key], tp, tp_rank)
            chunks = models[key]
            numbers = [[layer.layer_number for layer in c.decoder.layers] for c in chunks]
            if local_layers is None:
                local_layers = numbers
            assert numbers == local_layers, (numbers, local_layers)
            if step is not None:
                set_prores_step(chunks, step)  # collective on first call: outside forward_backward
            mb_losses = run_fwd_bwd(chunks, config, batches)
            mine = {
                "rank": rank,
                "tp_rank": tp_rank,
                "pp_rank": pp_rank,
                "mb_losses": mb_losses,
                "grads": collect_grads(chunks),
                "alphas": collect_alphas(chunks) if step is not None else {},
            }
            gathered = [None] * world_size
            torch.distributed.all_gather_object(gathered, mine)
            if rank == 0:
                res = aggregate(gathered, tp)
                res["step"] = step
                results[case] = res
        if cfg.get("monitor"):
            results["monitor"] = run_monitor_case(cfg, config, batches, specs, tp, rank, world_size)
        layers_info = {"rank": rank, "tp_rank": tp_rank, "pp_rank": pp_rank, "layers": local_layers}
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, layers_info)
    finally:
        parallel_state.destroy_model_parallel()
    elapsed = time.perf_counter() - t0
    if rank != 0:
        return None
    return {
        "parallel": {k: cfg.get(k) for k in ("tp", "pp", "vpp", "first", "last", "layout", "recompute")},
        "world_size": world_size,
        "ranks": gathered,
        "cases": results,
        "seconds": elapsed,
    }


def main(argv=None):
    t_start = time.perf_counter()
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", required=True, help="JSON list, or @file / a .json path")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    text = args.configs
    if text.startswith("@"):
        text = open(text[1:]).read()
    elif text.endswith(".json") and os.path.exists(text):
        text = open(text).read()
    configs = json.loads(text)

    torch.set_num_threads(1)
    install_cpu_shim(training=False)  # core-only: this worker never imports megatron.training
    torch.distributed.init_process_group(backend="gloo")
    rank = torch.distributed.get_rank()
    world_size = torch.distributed.get_world_size()
    startup_s = time.perf_counter() - t_start

    batches = make_batches()
    out = {"configs": {}}
    for cfg in configs:
        res = run_config(cfg, world_size, rank, batches)
        if rank == 0:
            out["configs"][cfg["name"]] = res
    assert "megatron.training" not in sys.modules, "the oracle worker must not import megatron.training"
    if rank == 0:
        from importlib.metadata import version

        out["meta"] = {
            "world_size": world_size,
            "megatron_core": version("megatron-core"),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
            "startup_seconds": startup_s,  # after `import torch`: megatron import + process group
            "total_seconds": time.perf_counter() - t_start,
        }
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
