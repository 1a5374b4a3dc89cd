"""ProRes's residual add: ``residual + alpha * dropout(x + bias)``, in fp32 and rounded once.

Modelled on megatron-core's ``fusions/fused_bias_dropout.py`` (same call shape, same train and
inference variants, compiled by megatron-core's own ``jit_fuser`` when bias-dropout fusion is on).

Contract: ``get_scaled_bias_dropout_add(training, fused)`` returns
``f(x_with_bias, residual, prob, alpha)``:
- ``alpha`` is a 0-dim fp32 tensor, never a Python float, so writing a new value into it in place
  neither recompiles the fused kernel nor invalidates a captured CUDA graph;
- everything is computed in fp32 (fp64 for fp64 inputs) whatever the input dtypes, and the result
  is rounded once to ``residual``'s dtype: bf16 runs get one rounding instead of three, and
  ``fp32_residual_connection`` keeps an fp32 residual stream, as in megatron-core;
- ``alpha * dropout(z) == dropout(alpha * z)`` for a fixed mask, so this is docs/method.md §2's
  ``h + alpha * F(h)`` with bias and dropout.
"""

from typing import Optional, Tuple

import torch

from . import compat


def _scaled_bias_dropout_add_func(x_with_bias: Tuple[torch.Tensor, Optional[torch.Tensor]], residual: torch.Tensor,
                                  prob: float, alpha: torch.Tensor, training: bool) -> torch.Tensor:
    x, bias = x_with_bias
    compute = torch.promote_types(torch.promote_types(x.dtype, residual.dtype), torch.float32)
    y = x.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    y = torch.nn.functional.dropout(y, p=prob, training=training)
    return (residual.to(compute) + alpha.to(compute) * y).to(residual.dtype)


def _unfused(training: bool):
    def scaled_bias_dropout_add(x_with_bias, residual, prob, alpha):
        return _scaled_bias_dropout_add_func(x_with_bias, residual, prob, alpha, training)

    return scaled_bias_dropout_add


@compat.jit_fuser
def scaled_bias_dropout_add_fused_train(x_with_bias: Tuple[torch.Tensor, Optional[torch.Tensor]],
                                        residual: torch.Tensor, prob: float, alpha: torch.Tensor) -> torch.Tensor:
    return _scaled_bias_dropout_add_func(x_with_bias, residual, prob, alpha, True)


@compat.jit_fuser
def scaled_bias_dropout_add_fused_inference(x_with_bias: Tuple[torch.Tensor, Optional[torch.Tensor]],
                                            residual: torch.Tensor, prob: float, alpha: torch.Tensor) -> torch.Tensor:
    return _scaled_bias_dropout_add_func(x_with_bias, residual, prob, alpha, False)


def get_scaled_bias_dropout_add(training: bool, fused: bool):
    """The residual-add function for this mode (see module docstring)."""
    if fused:
        return scaled_bias_dropout_add_fused_train if training else scaled_bias_dropout_add_fused_inference
    return _unfused(training)
