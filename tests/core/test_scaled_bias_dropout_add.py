"""The fp32 scaled bias-dropout-add, and alpha kept fp32 through bf16 casts.

Independent expectations: the formula residual + alpha * (x + bias) written out in fp32 and rounded
once; megatron-core's own bias-dropout-add; torch.autograd.gradcheck; dropout's mask law.
"""

import pytest
import torch

from models import llama_config

ALPHAS = [0.0, 1 / 3, 1e-3]


def f32(value):
    return torch.tensor(value, dtype=torch.float32)


def inputs(dtype, bias=True, residual_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 16, generator=g).to(dtype)
    b = torch.randn(16, generator=g).to(dtype) if bias else None
    r = torch.randn(4, 3, 16, generator=g).to(residual_dtype or dtype)
    return x, b, r


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("a", ALPHAS)
@pytest.mark.parametrize("dtype,residual_dtype,bias", [
    (torch.bfloat16, None, True), (torch.bfloat16, None, False), (torch.float16, None, True),
    (torch.bfloat16, torch.float32, True),  # --fp32-residual-connection: the stream stays fp32
])
def test_equals_the_fp32_formula_rounded_once(fused, a, dtype, residual_dtype, bias):
    from prores_megatron.core.scaled_bias_dropout_add import get_scaled_bias_dropout_add

    x, b, r = inputs(dtype, bias, residual_dtype)
    got = get_scaled_bias_dropout_add(training=False, fused=fused)((x, b), r, 0.0, f32(a))
    z = x.float() + (b.float() if bias else 0.0)
    expected = (r.float() + f32(a) * z).to(r.dtype)
    assert got.dtype == r.dtype and torch.equal(got, expected)
    if a == 1 / 3 and dtype == torch.bfloat16 and residual_dtype is None:
        # Rounding once differs from scaling in bf16 first (what casting alpha to bf16 gave).
        stale = r + (x * f32(a).to(dtype) + (b * f32(a).to(dtype) if bias else 0))
        assert not torch.equal(got, stale)


def test_alpha_one_equals_megatron_core_stock_function():
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    from prores_megatron.core.scaled_bias_dropout_add import get_scaled_bias_dropout_add

    x, b, r = inputs(torch.float32)
    got = get_scaled_bias_dropout_add(False, False)((x, b), r, 0.0, f32(1.0))
    stock = get_bias_dropout_add(False, False)((x.clone(), b.clone()), r.clone(), 0.0)  # stock works in place
    assert torch.equal(got, stock)


def test_changing_alpha_in_place_does_not_recompile():
    """The alpha tensor is an input of the compiled graph, not a constant baked into it."""
    import torch._dynamo

    from prores_megatron.core.scaled_bias_dropout_add import _scaled_bias_dropout_add_func

    torch._dynamo.reset()
    compiled = torch.compile(_scaled_bias_dropout_add_func, backend="eager")
    alpha = f32(0.25)
    x, b, r = inputs(torch.float32)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for value in (0.25, 0.5, 0.0, 1e-3):
            alpha.fill_(value)
            out = compiled((x, b), r, 0.0, alpha, False)
            assert torch.equal(out, r + value * (x + b) if value else r)


def test_fp64_gradcheck():
    from prores_megatron.core.scaled_bias_dropout_add import get_scaled_bias_dropout_add

    fn = get_scaled_bias_dropout_add(training=False, fused=False)
    x, b, r = (t.double().requires_grad_() for t in inputs(torch.float32))
    alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b, r, a: fn((x, b), r, 0.0, a), (x, b, r, alpha))


def test_dropout_keeps_its_mask_law():
    from prores_megatron.core.scaled_bias_dropout_add import get_scaled_bias_dropout_add

    torch.manual_seed(0)
    x = torch.randn(200_000) + 3.0  # nonzero, so a zero branch means a dropped element
    r = torch.zeros_like(x)
    a, p = 0.4, 0.3
    out = get_scaled_bias_dropout_add(training=True, fused=False)((x, None), r, p, f32(a))
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.005  # 0.3 dropped, +- 4.7 standard errors
    torch.testing.assert_close(out[kept], (f32(a) * x[kept]) / (1 - p), rtol=2e-7, atol=0)


def test_alpha_and_lns_factor_stay_fp32_through_float16module(mcore_world1):
    """Float16Module(bf16) rounds every floating buffer but alpha and 1/sqrt(l); the bf16 layer output
    equals the same layer computed with fp32 alpha and rounded once."""
    from megatron.core.transformer.module import Float16Module

    from prores_megatron import get_prores_layer_spec, set_prores_step
    from prores_megatron.core.residual_scale import DepthScaledNorm, ProResBiasDropoutAdd

    from models import gpt_model

    cfg = llama_config(num_layers=4, bf16=True)
    model = gpt_model(cfg, get_prores_layer_spec("local", warmup_steps=400.0, arch="lns", config=cfg))
    wrapped = Float16Module(cfg, model)
    set_prores_step(wrapped, 399)  # alpha(1) = 0.9975: 0.99609375 in bf16
    residuals = [m for m in wrapped.modules() if isinstance(m, ProResBiasDropoutAdd)]
    norms = [m for m in wrapped.modules() if isinstance(m, DepthScaledNorm)]
    assert len(residuals) == 8 and len(norms) == 8
    assert all(m.alpha.dtype == torch.float32 for m in residuals)
    assert all(m.depth_scale.dtype == torch.float32 for m in norms)
    assert residuals[0].alpha.item() == f32(399 / 400).item() != f32(399 / 400).bfloat16().float().item()
    assert next(model.parameters()).dtype == torch.bfloat16  # the model itself is bf16
    model.to(torch.float32).to(torch.bfloat16)  # later casts keep them too
    assert residuals[0].alpha.dtype == torch.float32 and norms[0].depth_scale.dtype == torch.float32

    module = residuals[0]
    x, b, r = inputs(torch.bfloat16, bias=False, seed=1)
    got = module(False, False)((x, None), r, 0.0)
    assert torch.equal(got, (r.float() + f32(399 / 400) * x.float()).bfloat16())


def test_a_closure_built_below_one_equals_stock_once_alpha_reaches_one():
    """The per-call function reads the buffer: built at alpha = 0.5, it is megatron-core's own
    bias-dropout-add, bit for bit (fp32), once alpha is 1."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    from prores_megatron.core.residual_scale import ProResBiasDropoutAdd

    module = ProResBiasDropoutAdd("linear", 4.0)
    module.set_alpha(0.5)
    fn = module(False, False)
    x, b, r = inputs(torch.float32)
    assert torch.equal(fn((x, b), r, 0.0), r + 0.5 * (x + b))
    module.set_alpha(1.0)
    stock = get_bias_dropout_add(False, False)((x.clone(), b.clone()), r.clone(), 0.0)
    assert torch.equal(fn((x, b), r, 0.0), stock)


def test_a_graph_captured_at_alpha_one_still_reads_the_buffer(monkeypatch):
    """While a CUDA graph is captured the alpha = 1 fast path is not taken: the captured function
    multiplies by the buffer, so a later alpha < 1 (a resume with another T) applies on replay."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    from prores_megatron.core.residual_scale import ProResBiasDropoutAdd

    module = ProResBiasDropoutAdd("linear", 4.0)
    module.set_alpha(1.0)
    x, b, r = inputs(torch.float32)
    eager = module(False, False)  # the fast path: megatron-core's function, which ignores the buffer
    module.alpha.fill_(0.25)
    assert torch.equal(eager((x.clone(), b.clone()), r.clone(), 0.0),
                       get_bias_dropout_add(False, False)((x.clone(), b.clone()), r.clone(), 0.0))
    module.alpha.fill_(1.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    captured = module(False, False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    module.alpha.fill_(0.25)  # what set_prores_step writes before a replay
    assert torch.equal(captured((x, b), r, 0.0), r + 0.25 * (x + b))
