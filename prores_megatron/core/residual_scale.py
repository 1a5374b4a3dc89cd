"""The ProRes residual-branch scale, as a drop-in for megatron-core's bias-dropout-add (BDA).

Contract: ``ProResBiasDropoutAdd`` is built by a layer spec in place of ``get_bias_dropout_add``.
Called like the stock BDA factory, ``module(training, fused)`` returns a function computing
``residual + dropout(alpha * (x + bias))``, which equals ``residual + alpha * dropout(x + bias)``
for any dropout mask: docs/method.md §2's ``h + alpha * F(h)``, alpha never touching the skip path.

alpha lives in a non-persistent 0-dim fp32 buffer (so checkpoints stay vanilla) that is only ever
updated in place (so CUDA graphs and torch.compile see new values without re-capture). The module
does not know its layer: ``set_prores_step`` fills it from the owning layer's global number.
"""

import functools

import torch

from . import compat
from .depth_scaling import lns_scale
from .schedules import check_schedule


class ProResBiasDropoutAdd(torch.nn.Module):
    """Bias-dropout-add whose branch input is scaled by alpha(layer, step) of one schedule."""

    def __init__(self, schedule: str = "linear", warmup_steps=None):
        super().__init__()
        self.schedule, self.warmup_steps = check_schedule(schedule, warmup_steps)
        # NaN until set: a forgotten set_prores_step is an error below, never a silent alpha.
        unset = 1.0 if self.schedule == "none" else float("nan")
        self.register_buffer("alpha", torch.tensor(unset, dtype=torch.float32), persistent=False)
        self.alpha_value = unset  # host mirror: no device sync to read it
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
        """``residual + dropout(alpha * (x + bias))``, recording the branch before alpha."""
        bda = compat.get_bias_dropout_add(training, fused)
        if self.alpha_value != self.alpha_value:
            raise RuntimeError(
                "ProRes alpha was never set for this layer: call "
                "prores_megatron.set_prores_step(model, step) before the forward pass "
                "(the Megatron-LM entry point does this every iteration)"
            )
        unit = self.alpha_value == 1.0
        if unit and rec is None:
            # Exact fast path: a multiply by 1.0 changes nothing in IEEE arithmetic (doc §4.6).
            return bda
        alpha = self.alpha

        def scaled_bias_dropout_add(x_with_bias, residual, prob):
            x, bias = x_with_bias
            if rec is not None:
                rec.branch(x, bias)
            if unit:
                return bda(x_with_bias, residual, prob)
            scale = alpha.to(x.dtype)  # a tensor, never a Python float: keeps graphs valid
            x = x * scale
            if bias is not None:
                bias = bias * scale
            return bda((x, bias), residual, prob)

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


class DepthScaledNorm(torch.nn.Module):
    """LayerNorm Scaling's pre-norm: ``Norm(x) / sqrt(l)``, a fixed factor, never learned.

    Built by the layer like any norm (config, hidden_size, eps), so a spec holds a class, made per
    backend norm by ``depth_scaled_norm(norm_class)``. The factor is bound from the owning layer's
    global number by ``set_prores_step`` (the norm is built without it), in a non-persistent buffer.
    """

    norm_class = None

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
        return self.norm(x) * self.depth_scale.to(x.dtype)


@functools.lru_cache(maxsize=None)
def depth_scaled_norm(norm_class) -> type:
    """A DepthScaledNorm subclass wrapping ``norm_class`` (one class per norm, cached)."""
    name = f"DepthScaled{getattr(norm_class, '__name__', 'Norm')}"
    return type(name, (DepthScaledNorm,), {"norm_class": norm_class, "__module__": __name__})
