"""Overhead of ProRes: step time and activation memory, ProRes mid-warmup vs ``--prores-schedule none``.

Builds two identical megatron-core GPT models (same weights, same batches) in one process, one with
a mid-warmup ProRes schedule (every alpha strictly between 0 and 1, so the multiply runs) and one
with ``none`` (alpha == 1: the stock bias-dropout-add), and times full forward+backward+SGD steps
interleaved A/B/A/B so drift hits both equally. Prints medians and the ratio ProRes / none.

Memory: on CUDA, peak allocated bytes per step; on CPU (no allocator statistics), the bytes autograd
keeps for backward (the activation memory), counted with saved-tensor hooks.
Targets (issue 7): step time <= 1.005x, memory <= 1.001x. Also the depth monitor's cost: the ProRes
model's step with ``prores_megatron.monitoring.layer_stats`` disarmed (an off-interval iteration) and armed (a
monitoring iteration, statistics accumulated in every residual), against the same model's plain step.

    python benchmarks/bench_overhead.py [--layers 32 --hidden 256 --seq 256 --batch 8 --steps 30]
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build(args, schedule, device):
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from prores_megatron import get_prores_layer_spec, set_prores_step

    cfg = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        ffn_hidden_size=args.hidden * 8 // 3 // 8 * 8, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        bias_activation_fusion=False, params_dtype=torch.float32,
    )
    torch.manual_seed(0)
    spec = get_prores_layer_spec("local", schedule=schedule, warmup_steps=1000.0 if schedule != "none" else None)
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=args.vocab,
                     max_sequence_length=args.seq, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False).to(device)
    # Mid-warmup: at step 500 with T = 1000 every layer has 0 < alpha <= 0.5 (linear).
    set_prores_step(model, 500 if schedule != "none" else 0)
    return model


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


def step(model, opt, tokens, positions, labels, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    counter = SavedBytes()
    with counter():
        loss = model(tokens, positions, None, labels=labels).float().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else counter.total
    return elapsed, memory


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30, help="timed steps per model (after 3 warm-up steps)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from prores_megatron.analysis.model_from_checkpoint import init_world1

    init_world1("cuda" if torch.cuda.is_available() else "cpu", seed=1)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    models = {name: build(args, name, device) for name in ("linear", "none")}
    opts = {name: torch.optim.SGD(m.parameters(), lr=1e-4) for name, m in models.items()}
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(args.seq, device=device).expand(args.batch, args.seq)
    from prores_megatron.monitoring.layer_stats import LayerMonitor

    monitor = LayerMonitor(models["linear"])
    times = {name: [] for name in (*models, "monitored")}
    memory = {name: [] for name in (*models, "monitored")}
    for i in range(args.steps + 3):
        order = ["linear", "none", "monitored"]
        order = order[i % 3:] + order[:i % 3]  # rotate, so drift hits every variant alike
        for name in order:
            model = models["linear" if name == "monitored" else name]
            if name == "monitored":
                monitor.start()
            elapsed, mem = step(model, opts["linear" if name == "monitored" else name], tokens, positions, labels, device)
            if name == "monitored":
                monitor.stop()
            if i >= 3:
                times[name].append(elapsed)
                memory[name].append(mem)
    med = {name: statistics.median(v) for name, v in times.items()}
    mem = {name: max(v) for name, v in memory.items()}
    what = "peak allocated (CUDA)" if device.type == "cuda" else "autograd-saved bytes (CPU)"
    print(f"device: {device} ({torch.get_num_threads()} threads); model: {args.layers} layers, hidden "
          f"{args.hidden}, seq {args.seq}, batch {args.batch}; {args.steps} interleaved steps each")
    print(f"step time median: ProRes {med['linear'] * 1e3:.2f} ms, none {med['none'] * 1e3:.2f} ms, "
          f"ratio {med['linear'] / med['none']:.4f} (target <= 1.005)")
    print(f"memory [{what}]: ProRes {mem['linear'] / 2**20:.3f} MiB, none {mem['none'] / 2**20:.3f} MiB, "
          f"ratio {mem['linear'] / mem['none']:.5f} (target <= 1.001)")
    print(f"depth monitor: monitoring iteration {med['monitored'] * 1e3:.2f} ms vs off-interval "
          f"{med['linear'] * 1e3:.2f} ms, ratio {med['monitored'] / med['linear']:.4f}; an off-interval "
          f"iteration runs the identical code path as monitoring off (one attribute test per residual)")


if __name__ == "__main__":
    main()
