"""Depth-dependent constants of the residual architectures and initialisations, as pure math.

Contract: every function is the formula of docs/method.md (§5.2 for the architectures, §6 for the
initialisations) with L = number of layers, l = 1-based global layer, sigma = the base std
(Megatron's --init-method-std, 0.02 in the paper). No torch, no Megatron.
"""

import math

ARCHS = ("pre", "post", "sandwich", "deepnorm", "lns")
"""Pre-LN, Post-LN, Sandwich-LN, DeepNorm, LayerNorm Scaling (docs/method.md §5)."""

INITS = ("megatron", "plain", "scaled", "ds", "deepnorm")
"""megatron-core's default, and the paper's four schemes (docs/method.md §6)."""


def deepnorm_skip_scale(num_layers: int) -> float:
    """DeepNorm's c in Norm(c*x + F(x)): (2L)^(1/4)."""
    return (2.0 * num_layers) ** 0.25


def deepnorm_init_gain(num_layers: int) -> float:
    """DeepNorm's beta: Xavier gain (8L)^(-1/4) on v, attention-output and all MLP projections."""
    return (8.0 * num_layers) ** -0.25


def lns_scale(layer: int) -> float:
    """LayerNorm Scaling's fixed factor 1/sqrt(l) on the pre-norm output of layer l."""
    return 1.0 / math.sqrt(layer)


def xavier_std(fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    """Xavier-normal std: gain * sqrt(2 / (fan_in + fan_out))."""
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def output_projection_std(scheme: str, sigma: float, layer: int, num_layers: int) -> float:
    """Std of a layer's attention-output and MLP-down projection under a normal-family scheme."""
    if scheme == "plain":
        return sigma
    if scheme in ("scaled", "megatron"):  # megatron-core already scales output layers
        return sigma / math.sqrt(2.0 * num_layers)
    if scheme == "ds":
        return sigma / math.sqrt(2.0 * layer)
    raise ValueError(f"scheme={scheme!r} has no single output-projection std; valid: plain, scaled, ds, megatron")
