"""The ProRes residual-branch scale, as a drop-in for megatron-core's bias-dropout-add (BDA).

Contract: ``ProResBiasDropoutAdd`` is built by a layer spec in place of ``get_bias_dropout_add``.
Called like the stock BDA factory, ``module(training, fused)`` returns a function computing
``residual + dropout(alpha * (x + bias))``, which equals ``residual + alpha * dropout(x + bias)``
for any dropout mask: the method doc's ``h + alpha * F(h)``, alpha never touching the skip path.

alpha lives in a non-persistent 0-dim fp32 buffer (so checkpoints stay vanilla) that is only ever
updated in place (so CUDA graphs and torch.compile see new values without re-capture). The module
does not know its layer: ``set_prores_step`` fills it from the owning layer's global number.
"""

import torch

from . import compat
from .schedules import canonical_schedule, needs_warmup_steps, _check_warmup


class ProResBiasDropoutAdd(torch.nn.Module):
    """Bias-dropout-add whose branch input is scaled by alpha(layer, step) of one schedule."""

    def __init__(self, schedule: str = "linear", warmup_steps=None):
        super().__init__()
        self.schedule = canonical_schedule(schedule)
        if needs_warmup_steps(self.schedule) or warmup_steps is not None:
            warmup_steps = _check_warmup(warmup_steps)
        self.warmup_steps = warmup_steps
        # NaN until set: a forgotten set_prores_step is an error below, never a silent alpha.
        unset = 1.0 if self.schedule == "none" else float("nan")
        self.register_buffer("alpha", torch.tensor(unset, dtype=torch.float32), persistent=False)
        self.alpha_value = unset  # host mirror: no device sync to read it
        self.step = None  # step alpha was last computed for

    def set_alpha(self, value: float, step=None) -> None:
        """Write alpha in place (host float64 value, cast once to the fp32 buffer)."""
        with torch.no_grad():
            self.alpha.fill_(value)
        self.alpha_value = float(value)
        self.step = step

    def forward(self, training: bool, fused: bool):
        bda = compat.get_bias_dropout_add(training, fused)
        if self.alpha_value == 1.0:
            # Exact fast path: a multiply by 1.0 changes nothing in IEEE arithmetic (doc §4.6).
            return bda
        if self.alpha_value != self.alpha_value:
            raise RuntimeError(
                "ProRes alpha was never set for this layer: call "
                "prores_megatron.set_prores_step(model, step) before the forward pass "
                "(the Megatron-LM entry point does this every iteration)"
            )
        alpha = self.alpha

        def scaled_bias_dropout_add(x_with_bias, residual, prob):
            x, bias = x_with_bias
            scale = alpha.to(x.dtype)  # a tensor, never a Python float: keeps graphs valid
            x = x * scale
            if bias is not None:
                bias = bias * scale
            return bda((x, bias), residual, prob)

        return scaled_bias_dropout_add

    def extra_repr(self) -> str:
        return f"schedule={self.schedule}, warmup_steps={self.warmup_steps}, alpha={self.alpha_value}"
