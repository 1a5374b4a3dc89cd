"""FP8 gradient scaling under ProRes: Transformer Engine's delayed scaling against current scaling.

Question: with FP8 "hybrid" training (E4M3 forward, E5M2 gradients), does TE's delayed-scaling recipe
(amax history 1024, amax_compute_algo "max", margin 0, initial scale 1.0) mishandle ProRes's ramping
residual branches, compared with current (tensorwise) scaling?

ProRes scales every branch output by alpha(l, t) in the bias-dropout-add *after* ``linear_proj`` /
``linear_fc2`` (prores_megatron/core/residual_scale.py, scaled_bias_dropout_add.py), so the gradient
w.r.t. those GEMM outputs -- the tensor TE quantizes to E5M2 for their dgrad and wgrad GEMMs -- is
alpha * (upstream gradient): exactly 0 while alpha = 0, then small and growing each step. The forward
E4M3 tensors (the GEMM inputs and weights) are not multiplied by alpha. Whole branches' backward is
alpha-scaled, so ``--all-gemms`` also analyses ``linear_qkv`` and ``linear_fc1``.

What it does: builds a real megatron-core GPT (local spec, RMSNorm, SwiGLU, RoPE) with
``with_prores(..., schedule, warmup_steps=T)`` on a world-size-1 CPU megatron, trains it with Adam on a
synthetic next-token task, setting alpha to step t with ``set_prores_step`` before each step. Forward
hooks on each layer's GEMMs keep the input activation x and put a tensor hook on the output, which
receives g = dL/d(output). Each g, multiplied by a constant factor per grad-magnitude setting, goes
through two emulated quantizers side by side, each stateful per tensor:

  delayed: the scale of backward pass k comes from the amax history of passes < k (max over the last
           ``--history`` amaxes; scale = fp8_max * 2^-margin / amax if amax is finite and > 0, else
           the previous scale; initial scale 1.0); the amax of pass k is recorded from the unquantized
           g of pass k. TE updates at the end of every backward of an fp8_autocast region, i.e. once
           per micro-batch: with ``--micro-batches M`` only the first micro-batch of a step sees the
           stale scale (the weight gradient the optimizer sees is the sum over the M micro-batches).
  current: scale = fp8_max / amax of this g (1.0 if amax is 0, inf or nan; FLT_MAX if it overflows);
           TE's Float8CurrentScaling with amax_epsilon 0 and no power-of-2 rounding.

Quantization is TE's saturating cast: clamp(g * scale, +-fp8_max) -> torch.float8_e5m2 (round to
nearest even, subnormals down to 2^-16) -> fp32 * (1 / scale). Per step and tensor: fraction of the
nonzero elements flushed to zero, fraction saturated (|g * scale| > fp8_max), relative error of the
dequantized gradient ||deq - g|| / ||g|| and of the weight gradient ||deq^T x - g^T x|| / ||g^T x||
(x in full precision, so only the gradient's quantization is measured). A schedule "none" model
(alpha = 1 from step 0: the stock model) is the control.

Gradient magnitude: delayed scaling is scale-invariant once its history is filled, but the first
step after amax == 0 uses scale 1.0, so what it loses depends on the absolute size of g. Here the loss
is the mean over batch*seq tokens (1024 by default) at hidden 128. In a Megatron 7B run (hidden 4096,
micro-batch 1 x 4096 tokens, loss divided by 32-128 accumulation steps, bf16, no loss scaling) the
per-element activation gradient is smaller by roughly 4 (tokens) x 32-128 (accumulation) x
sqrt(4096/128) ~ 5.7 (the same per-token norm spread over more elements), i.e. 700-3000x; this model's
native RMS is ~8e-4 (printed), so a 7B run sits near 3e-7..1e-6. Rather than trust that guess,
``--grad-rms`` sweeps the magnitude: each value sets one factor so that the stock (alpha = 1) model's
per-micro-batch linear_proj/linear_fc2 gradients at initialisation, pooled, have that RMS;
"native" keeps factor 1. The factor multiplies g before quantization, which is what scaling the loss
does (backward is linear in the loss).

Output: per schedule (the stock control first), step-by-step tables for layers 1 and L at
``--detail-rms``, a summary per grad magnitude and recipe over all layers and modules (wgrad error at
each tensor's switch-on step t_on, steps with wgrad error > 10 %, max saturated fraction, error after
t_on and at alpha = 1), and each layer's switch-on step with the steps it loses.

    python benchmarks/bench_fp8_scaling.py [--layers 8 --hidden 128 --seq 128 --batch 8 --steps 40 -T 4
        --schedules linear,stagewise-0 --grad-rms 1e-3,1e-5,1e-7 --detail-rms 1e-5 --micro-batches 1
        --all-gemms --threads 1]

Runs in about 1.5 minutes on one CPU thread with the defaults (``--micro-batches M`` costs M times the
training). No GPU and no Transformer Engine needed.
"""

import argparse
import logging
import math
import os
import sys
import time
from collections import deque

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

E5M2_MAX = float(torch.finfo(torch.float8_e5m2).max)  # 57344
E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
FLT_MAX = float(torch.finfo(torch.float32).max)
FP8 = {"e5m2": (torch.float8_e5m2, E5M2_MAX), "e4m3": (torch.float8_e4m3fn, E4M3_MAX)}
MODULES = {"proj": ("self_attention", "linear_proj"), "fc2": ("mlp", "linear_fc2"),
           "qkv": ("self_attention", "linear_qkv"), "fc1": ("mlp", "linear_fc1")}
BAD = 0.10  # relative wgrad error counted as a lost / damaged step


def f32(value: float) -> float:
    """Round a Python float to fp32, as TE's scale arithmetic is fp32."""
    return float(torch.tensor(value, dtype=torch.float32))


def quantize(g: torch.Tensor, scale: float, fmt: str, amax: float):
    """TE's saturating per-tensor cast, dequantized: (deq, number of saturated elements)."""
    dtype, fmax = FP8[fmt]
    scaled = g * scale
    sat = (scaled.abs() > fmax).sum().item() if amax * scale > fmax else 0
    q = scaled.clamp(-fmax, fmax).to(dtype)
    return q.to(torch.float32) * f32(1.0 / scale), sat


class DelayedScaling:
    """TE DelayedScaling for one tensor: the scale of step k comes from the amax history of steps < k."""

    def __init__(self, fmax: float, history: int, margin: float):
        self.scaled_max = fmax * 2.0 ** -margin
        self.history = deque(maxlen=history)
        self.scale = 1.0  # TE's initial scale

    def scale_for_step(self, amax):
        return self.scale

    def record(self, amax: float):
        self.history.append(amax)
        m = max(self.history)
        if math.isfinite(m) and m > 0:
            s = f32(self.scaled_max / m)
            self.scale = FLT_MAX if math.isinf(s) else s
        # else: keep the previous scale (delayed_scaling.cu)


class CurrentScaling:
    """TE Float8CurrentScaling (amax_epsilon 0, no power-of-2 rounding): scale from this tensor's amax."""

    def __init__(self, fmax: float, *_):
        self.fmax = fmax

    def scale_for_step(self, amax):
        if amax == 0 or not math.isfinite(amax):
            return 1.0
        s = f32(self.fmax / amax)
        return FLT_MAX if math.isinf(s) else s

    def record(self, amax: float):
        pass


RECIPES = {"delayed": DelayedScaling, "current": CurrentScaling}


def build(args, schedule):
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from prores_megatron import set_prores_step, with_prores

    cfg = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        ffn_hidden_size=args.hidden * 8 // 3 // 8 * 8, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        bias_activation_fusion=False, params_dtype=torch.float32,
    )
    torch.manual_seed(0)  # every model starts from the same weights
    spec = with_prores(get_gpt_layer_local_spec(normalization="RMSNorm"), schedule=schedule,
                       warmup_steps=None if schedule == "none" else float(args.T))
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=args.vocab,
                     max_sequence_length=args.seq, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    set_prores_step(model, 0)
    return model


def batch(args, gen):
    """Synthetic next-token task: x_{i+1} = (5 x_i + 3) mod V from a random start per sequence."""
    x = torch.empty(args.batch, args.seq + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, args.vocab, (args.batch,), generator=gen)
    for i in range(args.seq):
        x[:, i + 1] = (5 * x[:, i] + 3) % args.vocab
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


class Capture:
    """Forward hooks on each layer's GEMMs: keep the input, hook the output's gradient into ``sink``."""

    def __init__(self, model, modules, sink):
        from prores_megatron.core import compat

        self.handles = []
        self.layers = list(compat.decoder_layers(model))
        for layer in self.layers:
            for name in modules:
                parent, child = MODULES[name]
                mod = getattr(getattr(layer, parent), child)
                self.handles.append(mod.register_forward_hook(self._hook(layer.layer_number, name, sink)))

    @staticmethod
    def _hook(layer_number, name, sink):
        def fwd_hook(mod, inputs, output):
            x = inputs[0].detach()
            y = output[0] if isinstance(output, tuple) else output  # megatron linears return (out, bias)
            if y.requires_grad:
                y.register_hook(lambda g: sink(layer_number, name, x, g.detach()))

        return fwd_hook

    def remove(self):
        for h in self.handles:
            h.remove()


class Analyser:
    """Runs both recipes on each captured gradient, for every magnitude factor, stateful per tensor.

    Per micro-batch the quantizers see one gradient (TE updates the delayed-scaling history at the end
    of every backward pass of an fp8_autocast region, i.e. per micro-batch); ``end_step`` turns the
    step's sums into one row per tensor, factor and recipe: the weight gradient the optimizer sees is
    the sum over the micro-batches."""

    def __init__(self, factors, history, margin, fmt="e5m2"):
        self.factors, self.history, self.margin, self.fmt = factors, history, margin, fmt
        self.state = {}
        self.rows = {}  # (layer, module, factor label, recipe) -> list of per-step dicts
        self.acc = {}
        self.step, self.alphas = 0, {}

    def __call__(self, layer, name, x, g):
        x2 = x.reshape(-1, x.shape[-1]).float()
        g2 = g.reshape(-1, g.shape[-1]).float()
        fmax = FP8[self.fmt][1]
        zeros = (g2 == 0).sum().item()
        base = self.acc.setdefault((layer, name), dict(w=0.0, g_sq=0.0, n=0, nnz=0))
        base["w"] = base["w"] + g2.t() @ x2  # wgrad at factor 1
        base["g_sq"] += g2.double().pow(2).sum().item()
        base["n"] += g2.numel()
        base["nnz"] += g2.numel() - zeros
        keys, diffs = [], []
        for label, factor in self.factors:
            gf = g2 * factor
            amax = gf.abs().max().item()
            for recipe, cls in RECIPES.items():
                key = (layer, name, label, recipe)
                q = self.state.get(key)
                if q is None:
                    q = self.state[key] = cls(fmax, self.history, self.margin)
                scale = q.scale_for_step(amax)
                deq, sat = quantize(gf, scale, self.fmt, amax)
                q.record(amax)
                d = deq - gf
                acc = self.acc.setdefault(key, dict(d_sq=0.0, flushed=0, sat=0, scale=scale))
                acc["d_sq"] += d.double().pow(2).sum().item()
                acc["flushed"] += (deq == 0).sum().item() - zeros  # g == 0 gives deq == 0
                acc["sat"] += sat
                keys.append(key)
                diffs.append(d)
        wd = torch.matmul(torch.stack(diffs).transpose(1, 2), x2)  # (deq - g)^T x for every key at once
        for key, w in zip(keys, wd):
            acc = self.acc[key]
            acc["wd"] = acc.get("wd", 0.0) + w

    def end_step(self):
        for key, acc in self.acc.items():
            if len(key) == 2:
                continue
            layer, name, label, recipe = key
            base, factor = self.acc[(layer, name)], dict(self.factors)[label]
            g_norm = math.sqrt(base["g_sq"]) * factor
            w_norm = base["w"].norm().item() * factor
            if g_norm > 0:
                err = math.sqrt(acc["d_sq"]) / g_norm
                werr = acc["wd"].norm().item() / w_norm if w_norm > 0 else 0.0
            else:
                err = werr = float("nan")  # g == 0 exactly: nothing to lose (deq is 0 too)
            self.rows.setdefault(key, []).append(dict(
                t=self.step, alpha=self.alphas[layer], rms=g_norm / math.sqrt(base["n"]), scale=acc["scale"],
                flushed=acc["flushed"] / base["nnz"] if base["nnz"] else 0.0, sat=acc["sat"] / base["n"],
                err=err, werr=werr))
        self.acc = {}


def train(args, schedule, analyser, modules):
    """Trains one model for ``args.steps`` steps, alpha set to t before step t; fills ``analyser``."""
    from prores_megatron import alpha, set_prores_step

    model = build(args, schedule)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    cap = Capture(model, modules, analyser)
    gen = torch.Generator().manual_seed(1)
    positions = torch.arange(args.seq).expand(args.batch, args.seq)
    losses = []
    for t in range(args.steps):
        set_prores_step(model, t)
        analyser.step = t
        analyser.alphas = {l: alpha(schedule, l, t, None if schedule == "none" else float(args.T), args.layers)
                           for l in range(1, args.layers + 1)}
        for layer in cap.layers:  # the buffers the kernels read agree with the schedule
            assert abs(layer.mlp_bda.alpha_value - analyser.alphas[layer.layer_number]) < 1e-12
        total = 0.0
        for _ in range(args.micro_batches):  # Megatron: per-token mean over the micro-batch / micro-batches
            tokens, labels = batch(args, gen)
            loss = model(tokens, positions, None, labels=labels).float().mean() / args.micro_batches
            loss.backward()
            total += loss.item()
        analyser.end_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    cap.remove()
    return losses


def native_rms(args, modules):
    """Pooled RMS of the analysed gradients of the stock (alpha = 1) model at initialisation."""
    model = build(args, "none")
    sq, n = [0.0], [0]

    def sink(layer, name, x, g):
        sq[0] += g.double().pow(2).sum().item()
        n[0] += g.numel()

    cap = Capture(model, modules, sink)
    tokens, labels = batch(args, torch.Generator().manual_seed(1))
    positions = torch.arange(args.seq).expand(args.batch, args.seq)
    (model(tokens, positions, None, labels=labels).float().mean() / args.micro_batches).backward()
    cap.remove()
    return math.sqrt(sq[0] / n[0])


def pct(v):
    return "     -" if v != v else f"{100 * v:6.2f}" if v < 9.995 else f"{100 * v:6.0f}"


def on_step(rows):
    return next((r["t"] for r in rows if r["alpha"] > 0), None)


def full_step(rows):
    return next((r["t"] for r in rows if r["alpha"] >= 1.0), rows[-1]["t"])


def detail(analyser, layer, name, label, lo, hi):
    d, c = analyser.rows[(layer, name, label, "delayed")], analyser.rows[(layer, name, label, "current")]
    print(f"  layer {layer} {MODULES[name][1]} (grad RMS setting {label}); % columns: flushed = nonzero "
          f"elements -> 0, sat = saturated, err = ||deq-g||/||g||, wgrad = weight-gradient error; "
          f"log2(s) = log2 of the scale (of the step's first micro-batch)")
    print("     t   alpha    rms(g)  | delayed: log2(s)  flush%   sat%   err%  wgrad% | current: log2(s)  flush%"
          "   sat%   err%  wgrad%")
    for rd, rc in zip(d[lo:hi + 1], c[lo:hi + 1]):
        print(f"  {rd['t']:4d}  {rd['alpha']:.4f}  {rd['rms']:9.2e}  |        {math.log2(rd['scale']):7.2f}  "
              f"{pct(rd['flushed'])} {pct(rd['sat'])} {pct(rd['err'])}  {pct(rd['werr'])} |        "
              f"{math.log2(rc['scale']):7.2f}  {pct(rc['flushed'])} {pct(rc['sat'])} {pct(rc['err'])}  {pct(rc['werr'])}")


def summarise(analyser, schedule, labels, layers, modules):
    print(f"  summary over {len(layers) * len(modules)} tensors ({len(layers)} layers x "
          f"{'/'.join(MODULES[m][1] for m in modules)}); t_on = the tensor's first step with alpha > 0; "
          f"'bad' = wgrad error > {BAD:.0%}")
    print("    grad RMS   recipe  | wgrad err at t_on: min / median / max | flush% at t_on (med) | bad steps (total, "
          "max/tensor) | bad offsets t-t_on | max sat% | max wgrad% t>t_on | wgrad% median, alpha=1")
    for label in labels:
        for recipe in RECIPES:
            on_err, on_fl, bad, offsets, sat, later, steady = [], [], 0, set(), 0.0, 0.0, []
            per_tensor = []
            for l in layers:
                for m in modules:
                    rows = analyser.rows[(l, m, label, recipe)]
                    t_on = on_step(rows)
                    on_err.append(rows[t_on]["werr"])
                    on_fl.append(rows[t_on]["flushed"])
                    nb = 0
                    for r in rows[t_on:]:
                        sat = max(sat, r["sat"])
                        if r["werr"] > BAD:
                            nb += 1
                            offsets.add(r["t"] - t_on)
                        if r["t"] > t_on:
                            later = max(later, r["werr"])
                        if r["alpha"] >= 1.0:
                            steady.append(r["werr"])
                    bad += nb
                    per_tensor.append(nb)
            on_err.sort()
            off = ",".join(str(o) for o in sorted(offsets)) or "none"
            med = lambda v: sorted(v)[len(v) // 2] if v else float("nan")
            print(f"    {label:>8}  {recipe:>7}  |      {pct(on_err[0])} / {pct(med(on_err))} / {pct(on_err[-1])}        |"
                  f"        {pct(med(on_fl))}        |      {bad:4d}, {max(per_tensor):3d}            | {off:>18} | "
                  f"{pct(sat)}   |     {pct(later)}        |   {pct(med(steady))}")


def per_layer(analyser, label, layers, modules):
    print(f"  per layer (grad RMS setting {label}): switch-on step t_on; per module: delayed wgrad error at "
          f"t_on, the steps with wgrad error > {BAD:.0%} under delayed / under current scaling")
    head = " | ".join(f"{MODULES[m][1]:<31}" for m in modules)
    print(f"    layer  t_on | {head}".rstrip())
    for l in layers:
        cells = []
        t_on = None
        for m in modules:
            d, c = analyser.rows[(l, m, label, "delayed")], analyser.rows[(l, m, label, "current")]
            t_on = on_step(d)
            bad_d = [r["t"] for r in d[t_on:] if r["werr"] > BAD]
            bad_c = [r["t"] for r in c[t_on:] if r["werr"] > BAD]
            cells.append(f"{pct(d[t_on]['werr'])} %  {','.join(map(str, bad_d)) or 'none':>12} / "
                         f"{','.join(map(str, bad_c)) or 'none':<6}")
        print((f"    {l:5d}  {t_on:4d} | " + " | ".join(cells)).rstrip())


def parse_rms(text):
    out = []
    for item in text.split(","):
        item = item.strip()
        out.append((item, None) if item == "native" else (item, float(item)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per model (default 40 = T*L + 8)")
    p.add_argument("-T", "--warmup-steps", dest="T", type=float, default=4.0, help="ProRes per-layer warmup T")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--schedules", default="linear,stagewise-0",
                   help="ProRes schedules to test (comma-separated); the stock model (schedule none) always runs")
    p.add_argument("--grad-rms", default="1e-3,1e-5,1e-7",
                   help="gradient-magnitude settings: target pooled RMS of the alpha = 1 gradient at init, or 'native'")
    p.add_argument("--detail-rms", default="1e-5", help="the --grad-rms setting shown step by step")
    p.add_argument("--history", type=int, default=1024, help="delayed scaling amax_history_len")
    p.add_argument("--margin", type=float, default=0.0, help="delayed scaling margin")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="micro-batches per optimizer step (gradient accumulation); delayed scaling updates per micro-batch")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    p.add_argument("--all-gemms", action="store_true", help="also analyse linear_qkv and linear_fc1 (alpha-scaled too)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)  # "GPTModel IS DEPRECATED"
    from prores_megatron.analysis.model_from_checkpoint import init_world1

    init_world1("cpu", seed=1)
    modules = ["proj", "fc2"] + (["qkv", "fc1"] if args.all_gemms else [])
    base = native_rms(args, ["proj", "fc2"])  # the same factors with or without --all-gemms
    settings = parse_rms(args.grad_rms)
    factors = [(label, 1.0 if target is None else target / base) for label, target in settings]
    labels = [label for label, _ in factors]
    if args.detail_rms not in labels:
        p.error(f"--detail-rms {args.detail_rms!r} is not one of --grad-rms {labels}")
    layers = list(range(1, args.layers + 1))
    print(f"model: megatron-core GPT, {args.layers} layers, hidden {args.hidden}, seq {args.seq}, micro-batch {args.batch} x "
          f"{args.micro_batches} per step, vocab {args.vocab}; Adam lr {args.lr}; {args.steps} steps; ProRes T = {args.T:g}")
    print(f"FP8 gradients: E5M2 (max {E5M2_MAX:g}, min subnormal 2^-16); delayed scaling: history {args.history}, "
          f"algo max, margin {args.margin:g}, initial scale 1.0; current scaling: scale = max/amax of the tensor")
    print(f"native pooled RMS of the stock model's linear_proj/linear_fc2 output gradients "
          f"at init: {base:.3e}; factors: " + ", ".join(f"{lab} -> x{f:.3g}" for lab, f in factors))
    for schedule in ["none", *[s.strip() for s in args.schedules.split(",") if s.strip()]]:
        analyser = Analyser(factors, args.history, args.margin)
        t1 = time.perf_counter()
        losses = train(args, schedule, analyser, modules)
        title = "stock control: alpha = 1 from step 0" if schedule == "none" else f"ProRes {schedule}, T = {args.T:g}"
        print(f"\n=== {title} (loss {losses[0]:.3f} -> {losses[-1]:.3f}; {time.perf_counter() - t1:.1f} s) ===")
        detail_layers = [1, args.layers] if schedule != "none" else [1]
        for l in detail_layers:
            for m in modules:
                rows = analyser.rows[(l, m, args.detail_rms, "delayed")]
                t_on = on_step(rows)
                hi = min(full_step(rows) + 2, args.steps - 1) if schedule != "none" else min(3, args.steps - 1)
                detail(analyser, l, m, args.detail_rms, max(t_on - 1, 0), hi)
        summarise(analyser, schedule, labels, layers, modules)
        if schedule != "none":
            per_layer(analyser, args.detail_rms, layers, modules)
    print(f"\ntotal runtime {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
