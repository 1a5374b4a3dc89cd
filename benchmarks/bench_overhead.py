"""Overhead of ProRes against megatron-core's stock layer: step time and activation memory.

Builds identical megatron-core GPT models (same weights, same batches) in one process: the stock
local layer spec (no ProRes at all), ProRes mid-warmup (every alpha strictly between 0 and 1, so the
scaled fp32 bias-dropout-add runs) and ProRes after the warmup (alpha == 1: the stock
bias-dropout-add again), with bias-dropout fusion on as in Megatron-LM's default (``--no-fusion``
turns it off). It times full forward+backward+SGD steps in rounds, every variant once per round in a
rotating order so drift hits all alike (alpha < 1 and alpha = 1 interleaved with stock), and prints
each ratio to stock as the median of the per-round ratios with a 95 % bootstrap interval over rounds.
The ProRes variants write a new alpha every round inside the timed step (its real per-iteration
cost in the Megatron-LM loop); on CUDA the weights are made on the GPU and steps are timed with
CUDA events.

Memory: on CUDA, peak allocated bytes per step; on CPU (no allocator statistics), the bytes autograd
keeps for backward (the activation memory), counted with saved-tensor hooks.
Targets: step time <= 1.005x, memory <= 1.001x. Also the depth monitor's cost: the mid-warmup model's
step with ``prores_megatron.monitoring.layer_stats`` armed (a monitoring iteration, statistics
accumulated in every residual) against its plain (off-interval) step.

    python benchmarks/bench_overhead.py [--layers 32 --hidden 256 --seq 256 --batch 8 --steps 30 --no-fusion]

On a GPU, the flagship layer shapes (``--shape 7b``: hidden 4096, 32 heads, FFN 11008, seq 4096;
``--shape 120l``: hidden 2048, 16 heads, FFN 5632, seq 4096; micro-batch 1, a few layers, since the
overhead is per layer) in bf16 through Megatron's ``Float16Module`` (``--dtype bf16``), with the
Transformer Engine spec (``--spec te``) and FP8 (``--fp8 tensorwise|delayed``, hybrid format):

    python benchmarks/bench_overhead.py --shape 7b --layers 4 --dtype bf16 --spec te [--fp8 tensorwise]
"""

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


VARIANTS = ("stock", "prores_mid", "prores_on")
# Layer shapes of the two launch scripts (examples/scripts/pretrain_{llama2_7b,120l}_prores.sh).
SHAPES = {
    "7b": dict(hidden=4096, heads=32, ffn=11008, seq=4096, batch=1),
    "120l": dict(hidden=2048, heads=16, ffn=5632, seq=4096, batch=1),
}


def stock_spec(args):
    if args.spec == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization="RMSNorm")


def build(args, variant, device):
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from prores_megatron import set_prores_step, with_prores

    bf16 = args.dtype == "bf16"
    fp8 = {} if args.fp8 == "none" else dict(fp8="hybrid", fp8_recipe=args.fp8)
    cfg = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        ffn_hidden_size=args.ffn or args.hidden * 8 // 3 // 8 * 8, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        # Weights are made where they will live: on the GPU (Megatron-LM's default) or the CPU.
        attention_dropout=0.0, use_cpu_initialization=device.type == "cpu", bias_dropout_fusion=args.fusion,
        masked_softmax_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        apply_rope_fusion=False, bias_activation_fusion=False, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, **fp8,
    )
    torch.manual_seed(0)
    if device.type == "cuda":  # GPU init draws from the model-parallel RNG tracker: reseed it per model
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
    stock = stock_spec(args)
    spec = stock if variant == "stock" else with_prores(stock, schedule="linear", warmup_steps=1000.0)
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=args.vocab,
                     max_sequence_length=args.seq, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False).to(device)
    if bf16:
        model = Float16Module(cfg, model)  # what Megatron-LM wraps a bf16 model in (casts buffers too)
    if variant != "stock":
        set_prores_step(model, alpha_step(args, variant, 0))
    return model


def alpha_step(args, variant, i):
    """The step whose alpha round ``i`` writes. Mid-warmup: t = 500 + i with T = 1000, so every layer
    has 0 < alpha < 1 (linear) and alpha changes every round; after the warmup: t = T*L + i (all 1)."""
    return (500 if variant == "prores_mid" else 1000 * args.layers) + i


def ratio_with_interval(num, den, rounds=2000, seed=0):
    """Median of the per-round ratios num/den and its 95 % bootstrap interval over rounds."""
    import random

    ratios = [a / b for a, b in zip(num, den)]
    rng = random.Random(seed)
    boots = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(rounds))
    return statistics.median(ratios), boots[int(0.025 * rounds)], boots[int(0.975 * rounds) - 1]


class SavedBytes:
    """Bytes of the tensors autograd saves for backward during one forward."""

    def __init__(self):
        self.total = 0
        self.seen = set()

    def pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in self.seen:
            self.seen.add(key)
            self.total += t.numel() * t.element_size()
        return t

    def __call__(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def step(model, opt, tokens, positions, labels, device, set_alpha=None):
    """One timed training step; ``set_alpha`` (ProRes variants) writes this iteration's alpha inside
    the timed region, as the Megatron-LM integration does once per iteration. CUDA: CUDA events
    around the step on the current stream; CPU: wall clock."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    if set_alpha is not None:
        set_alpha()
    counter = SavedBytes()
    # CUDA has allocator statistics; the saved-tensor hooks would only add host work to time.
    with counter() if device.type == "cpu" else contextlib.nullcontext():
        loss = model(tokens, positions, None, labels=labels).float().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        end.record()
        end.synchronize()
        elapsed = start.elapsed_time(end) / 1e3
    else:
        elapsed = time.perf_counter() - t0
    memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else counter.total
    return elapsed, memory


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), help="a flagship layer shape (overrides the sizes)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=0, help="FFN size (default: 8/3 hidden, a multiple of 8)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--spec", choices=("local", "te"), default="local",
                   help="megatron-core's local or Transformer Engine layer spec (te needs a GPU and TE)")
    p.add_argument("--fp8", choices=("none", "tensorwise", "delayed"), default="none",
                   help="FP8 (hybrid format) recipe; needs --spec te on an FP8-capable GPU")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30, help="timed rounds (after 3 warm-up rounds)")
    p.add_argument("--no-fusion", dest="fusion", action="store_false",
                   help="bias-dropout fusion off (Megatron-LM's --no-bias-dropout-fusion)")
    args = p.parse_args(argv)
    for key, value in SHAPES.get(args.shape, {}).items():
        setattr(args, key, value)
    if args.spec == "te" and not torch.cuda.is_available():
        p.error("--spec te needs a GPU with Transformer Engine")
    if args.fp8 != "none" and args.spec != "te":
        p.error("--fp8 needs --spec te (FP8 runs through Transformer Engine)")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from prores_megatron.analysis.model_from_checkpoint import init_world1

    init_world1("cuda" if torch.cuda.is_available() else "cpu", seed=1)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    models = {name: build(args, name, device) for name in VARIANTS}
    opts = {name: torch.optim.SGD(m.parameters(), lr=0.0) for name, m in models.items()}  # weights stay equal
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(args.seq, device=device).expand(args.batch, args.seq)
    from prores_megatron import set_prores_step
    from prores_megatron.monitoring.layer_stats import LayerMonitor

    monitor = LayerMonitor(models["prores_mid"])
    names = [*VARIANTS, "monitored"]
    times = {name: [] for name in names}
    memory = {name: [] for name in names}
    for i in range(args.steps + 3):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate, so drift hits every variant alike
        for name in order:
            base = "prores_mid" if name == "monitored" else name
            if name == "monitored":
                monitor.start()
            set_alpha = None if base == "stock" else (
                lambda m=models[base], t=alpha_step(args, base, i): set_prores_step(m, t, check_coverage=False))
            elapsed, mem = step(models[base], opts[base], tokens, positions, labels, device, set_alpha)
            if name == "monitored":
                monitor.stop()
            if i >= 3:
                times[name].append(elapsed)
                memory[name].append(mem)
    med = {name: statistics.median(v) for name, v in times.items()}
    mem = {name: max(v) for name, v in memory.items()}
    what = "peak allocated (CUDA)" if device.type == "cuda" else "autograd-saved bytes (CPU)"
    print(f"device: {device} ({torch.get_num_threads()} threads); model: {args.layers} layers, hidden "
          f"{args.hidden}, FFN {models['stock'].config.ffn_hidden_size}, seq {args.seq}, batch {args.batch}; "
          f"{args.dtype}, {args.spec} spec, FP8 {args.fp8}; bias-dropout fusion "
          f"{'on' if args.fusion else 'off'}; {args.steps} rounds, every variant once per round")
    print(f"step time median: stock {med['stock'] * 1e3:.2f} ms, ProRes mid-warmup {med['prores_mid'] * 1e3:.2f} ms, "
          f"ProRes alpha = 1 {med['prores_on'] * 1e3:.2f} ms")
    for name, label in (("prores_mid", "mid-warmup"), ("prores_on", "alpha = 1")):
        r, lo, hi = ratio_with_interval(times[name], times["stock"])
        print(f"  ProRes {label} / stock: {r:.4f} (95 % interval {lo:.4f} .. {hi:.4f}; target <= 1.005)")
    for name, label in (("prores_mid", "mid-warmup"), ("prores_on", "alpha = 1")):
        print(f"memory [{what}] ProRes {label} / stock: {mem[name] / mem['stock']:.5f} "
              f"({mem[name] / 2**20:.3f} vs {mem['stock'] / 2**20:.3f} MiB; target <= 1.001)")
    r, lo, hi = ratio_with_interval(times["monitored"], times["prores_mid"])
    print(f"depth monitor: monitoring iteration / off-interval iteration {r:.4f} (95 % interval {lo:.4f} .. "
          f"{hi:.4f}); an off-interval iteration runs the same code path as monitoring off")


if __name__ == "__main__":
    main()
