"""Per-token statistics of layer tensors for the checkpoint analysis (docs/method.md §8). Pure torch.

Contract:
- ``token_cosine(u, v)``: u and v are the same layer's tensors ([..., h], e.g. [s, b, h]) from
  two checkpoints on the same batch; returns the mean over tokens of cos(u_token, v_token), in
  float64. A token where either vector is exactly zero has no direction and is left out; NaN if
  every token is. For the layerwise cosine, u_l = A_l + M_l: the raw attention and MLP branch
  outputs before alpha. One alpha scales both, so cos(alpha*u, u') = cos(u, u') for alpha > 0:
  the raw version equals the with-alpha one and stays defined while alpha = 0.
- ``token_norm(x)``: mean over tokens of the per-token L2 norm (the activation norm across depth).
"""

import math

import torch


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64).reshape(-1, x.shape[-1])


def token_cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    if u.shape != v.shape:
        raise ValueError(f"token_cosine: shapes differ ({tuple(u.shape)} vs {tuple(v.shape)}); "
                         "both checkpoints must see the same batch")
    a, b = _tokens(u), _tokens(v)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    ok = den > 0
    if not bool(ok.any()):
        return math.nan
    return float(((a * b).sum(dim=-1)[ok] / den[ok]).mean())


def token_norm(x: torch.Tensor) -> float:
    return float(_tokens(x).norm(dim=-1).mean())
