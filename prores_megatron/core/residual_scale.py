"""The ProRes residual-branch scale, as a drop-in for megatron-core's bias-dropout-add (BDA).

Contract: ``ProResBiasDropoutAdd`` is built by a layer spec in place of ``get_bias_dropout_add``.
Called like the stock BDA factory, ``module(training, fused)`` returns a function computing
``residual + dropout(alpha * (x + bias))``, which equals ``residual + alpha * dropout(x + bias)``
for any dropout mask: docs/method.md §2's ``h + alpha * F(h)``, alpha never touching the skip path.

alpha lives in a non-persistent 0-dim fp32 buffer (so checkpoints stay vanilla) that is only ever
updated in place (so CUDA graphs and torch.compile see new values without re-capture), and that
stays fp32 through ``.bfloat16()`` / ``Float16Module`` (as does LNS's 1/sqrt(l)): the branch is
scaled in fp32 and rounded once (``scaled_bias_dropout_add``), so the export folds exactly the alpha
the kernel used. At alpha = 1 megatron-core's own bias-dropout-add runs unchanged. The module does
not know its layer: ``set_prores_step`` fills it from the owning layer's global number.
"""

import functools

import torch

from . import compat
from .depth_scaling import lns_scale
from .scaled_bias_dropout_add import get_scaled_bias_dropout_add
from .schedules import check_schedule


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class _Fp32Buffers(torch.nn.Module):
    """Keeps the buffers named in ``FP32_BUFFERS`` fp32 through ``.to()``, ``.half()``,
    ``.bfloat16()`` and megatron-core's ``Float16Module``: they move with the module, but their
    values are never rounded to the model's dtype (alpha = 0.9975 would become 0.99609375 in bf16)."""

    FP32_BUFFERS = ()

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers[name] for name in self.FP32_BUFFERS if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, value in kept.items():
            moved = self._buffers[name]
            if moved.dtype != torch.float32:  # fn cast it: keep the fp32 value, on fn's device
                self._buffers[name] = value.to(device=moved.device)
        return self


class ProResBiasDropoutAdd(_Fp32Buffers):
    """Bias-dropout-add whose branch input is scaled by alpha(layer, step) of one schedule."""

    FP32_BUFFERS = ("alpha",)

    def __init__(self, schedule: str = "linear", warmup_steps=None):
        super().__init__()
        self.schedule, self.warmup_steps = check_schedule(schedule, warmup_steps)
        # NaN until set: a forgotten set_prores_step is an error below, never a silent alpha.
        unset = 1.0 if self.schedule == "none" else float("nan")
        self.register_buffer("alpha", torch.tensor(unset, dtype=torch.float32), persistent=False)
        self.alpha_value = unset  # host mirror: no device sync to read it
        # Off under CUDA graphs (set_prores_step reads the layer's cuda_graph_impl): the eager warm-up
        # then compiles and runs the very function the graph captures, which reads the alpha buffer.
        self.fast_path = True
        self.recorder = None  # armed by prores_megatron.monitoring.layer_stats
        self.record_in_eval = False

    def set_alpha(self, value: float) -> None:
        """Write alpha in place (host float64 value, cast once to the fp32 buffer)."""
        with torch.no_grad():
            self.alpha.fill_(value)
        self.alpha_value = float(value)

    def forward(self, training: bool, fused: bool):
        # A monitor (prores_megatron.monitoring.layer_stats) may have armed a recorder; disarmed this is the
        # whole cost of monitoring.
        rec = self.recorder if (training or self.record_in_eval) else None
        fn = self._residual_fn(training, fused, rec)
        if rec is None:
            return fn

        def recorded_residual(x_with_bias, residual, prob):
            out = fn(x_with_bias, residual, prob)
            rec.output(out)
            return out

        return recorded_residual

    def _residual_fn(self, training, fused, rec):
        """The residual function of this architecture; subclasses wrap ``_scaled_add``."""
        return self._scaled_add(training, fused, rec)

    def _scaled_add(self, training, fused, rec):
        """``residual + alpha * dropout(x + bias)`` in fp32 (``scaled_bias_dropout_add``), recording
        the branch before alpha; megatron-core's own function at alpha = 1."""
        bda = compat.get_bias_dropout_add(training, fused)
        scaled = get_scaled_bias_dropout_add(training, fused)
        if self.alpha_value != self.alpha_value:
            raise RuntimeError(
                "ProRes alpha was never set for this layer: call "
                "prores_megatron.set_prores_step(model, step) before the forward pass "
                "(the Megatron-LM entry point does this every iteration)"
            )
        unit = self.alpha_value == 1.0 and self.fast_path and not _capturing()
        if unit and rec is None:
            # Exact fast path: a multiply by 1.0 changes nothing in IEEE arithmetic (docs/method.md
            # §4.6). Never while a CUDA graph is captured: the graph must read the alpha buffer, so
            # that a later alpha < 1 (a resume with another schedule) still applies on replay.
            return bda
        alpha = self.alpha

        def scaled_bias_dropout_add(x_with_bias, residual, prob):
            x, bias = x_with_bias
            if rec is not None:
                rec.branch(x, bias)
            if unit:
                return bda(x_with_bias, residual, prob)
            return scaled(x_with_bias, residual, prob, alpha)  # alpha: the fp32 buffer, never a float

        return scaled_bias_dropout_add

    def extra_repr(self) -> str:
        return f"schedule={self.schedule}, warmup_steps={self.warmup_steps}, alpha={self.alpha_value}"


class _NormOwningBiasDropoutAdd(ProResBiasDropoutAdd):
    """A ProRes residual that owns a norm (``norm``: the backend's norm class or spec)."""

    def __init__(self, schedule="linear", warmup_steps=None, config=None, norm=None):
        super().__init__(schedule, warmup_steps)
        if config is None or norm is None:
            raise ValueError(f"{type(self).__name__} needs the TransformerConfig and a norm class")
        self.norm = compat.build_module(
            norm, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )


class ProResSandwichBiasDropoutAdd(_NormOwningBiasDropoutAdd):
    """Sandwich-LN: ``residual + dropout(alpha * Norm'(x + bias))``; alpha after the post-norm gain."""

    def _residual_fn(self, training, fused, rec):
        scaled_add = self._scaled_add(training, fused, rec)
        norm = self.norm

        def sandwich_bias_dropout_add(x_with_bias, residual, prob):
            x, bias = x_with_bias
            if bias is not None:
                x = x + bias
            return scaled_add((norm(x), None), residual, prob)

        return sandwich_bias_dropout_add


class ProResPostNormBiasDropoutAdd(_NormOwningBiasDropoutAdd):
    """Post-LN / DeepNorm: ``Norm(c * residual + dropout(alpha * (x + bias)))``, c on the skip only."""

    def __init__(self, schedule="linear", warmup_steps=None, config=None, norm=None, skip_scale=1.0):
        super().__init__(schedule, warmup_steps, config, norm)
        self.skip_scale = float(skip_scale)  # a run-long constant: a Python float is safe here

    def _residual_fn(self, training, fused, rec):
        scaled_add = self._scaled_add(training, fused, rec)
        norm, c = self.norm, self.skip_scale

        def post_norm_bias_dropout_add(x_with_bias, residual, prob):
            if c != 1.0:
                residual = residual * c
            return norm(scaled_add(x_with_bias, residual, prob))

        return post_norm_bias_dropout_add

    def extra_repr(self) -> str:
        return super().extra_repr() + f", skip_scale={self.skip_scale:.6g}"


class DepthScaledNorm(_Fp32Buffers):
    """LayerNorm Scaling's pre-norm: ``Norm(x) / sqrt(l)``, a fixed factor, never learned.

    Built by the layer like any norm (config, hidden_size, eps), so a spec holds a class, made per
    backend norm by ``depth_scaled_norm(norm_class)``. The factor is bound from the owning layer's
    global number by ``set_prores_step`` (the norm is built without it), in a non-persistent buffer.
    """

    norm_class = None
    FP32_BUFFERS = ("depth_scale",)

    def __init__(self, config, hidden_size, eps=1e-5, **_):
        super().__init__()
        if self.norm_class is None:
            raise TypeError("use depth_scaled_norm(norm_class) to get a buildable DepthScaledNorm")
        self.norm = compat.build_module(self.norm_class, config=config, hidden_size=hidden_size, eps=eps)
        self.register_buffer("depth_scale", torch.tensor(float("nan")), persistent=False)
        self.layer_number = None

    def bind_layer(self, layer_number: int) -> None:
        with torch.no_grad():
            self.depth_scale.fill_(lns_scale(layer_number))
        self.layer_number = layer_number

    def forward(self, x):
        if self.layer_number is None:
            raise RuntimeError(
                "LayerNorm Scaling's 1/sqrt(l) was never bound: call "
                "prores_megatron.set_prores_step(model, step) before the forward pass"
            )
        out = self.norm(x)
        return (out.float() * self.depth_scale).to(out.dtype)  # 1/sqrt(l) in fp32, rounded once


@functools.lru_cache(maxsize=None)
def depth_scaled_norm(norm_class) -> type:
    """A DepthScaledNorm subclass wrapping ``norm_class`` (one class per norm, cached)."""
    name = f"DepthScaled{getattr(norm_class, '__name__', 'Norm')}"
    return type(name, (DepthScaledNorm,), {"norm_class": norm_class, "__module__": __name__})
