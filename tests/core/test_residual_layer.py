"""One ProRes decoder layer against megatron-core's vanilla layer and a plain-torch Pre-LN layer."""

import math

import pytest
import torch

from models import llama_config

pytestmark = pytest.mark.usefixtures("mcore_world1")

S, B = 8, 2


def build_layer(spec, config, layer_number=3):
    from megatron.core.transformer.spec_utils import build_module

    torch.manual_seed(0)
    return build_module(spec, config=config, layer_number=layer_number)


def prores_layer(config, **kw):
    from prores_megatron import get_prores_layer_spec

    return build_layer(get_prores_layer_spec("local", schedule="linear", warmup_steps=10.0, **kw), config)


def set_layer_alpha(layer, value):
    from prores_megatron import ProResBiasDropoutAdd

    scales = [m for m in layer.modules() if isinstance(m, ProResBiasDropoutAdd)]
    assert len(scales) == 2  # attention and MLP, one alpha each
    for s in scales:
        s.set_alpha(value)


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_layer(arch, x, sd, cfg, a, l):
    """Method doc §5.2 for one decoder layer, written from scratch from the layer's own weights."""
    nh, ng, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    hpg, eps, L = nh // ng, cfg.layernorm_epsilon, cfg.num_layers
    s, b, H = x.shape

    def A(z):
        w = sd["self_attention.linear_qkv.weight"].view(ng, hpg + 2, d, H)
        q = torch.einsum("sbh,gjdh->sbgjd", z, w[:, :hpg]).reshape(s, b, nh, d)
        k = torch.einsum("sbh,gdh->sbgd", z, w[:, hpg])
        v = torch.einsum("sbh,gdh->sbgd", z, w[:, hpg + 1])
        k = k.repeat_interleave(hpg, dim=2)  # query head j uses group j // hpg
        v = v.repeat_interleave(hpg, dim=2)
        scores = torch.einsum("qbnd,kbnd->bnqk", q, k) / math.sqrt(d)
        causal = torch.ones(s, s, dtype=torch.bool).triu(1)
        probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
        ctx = torch.einsum("bnqk,kbnd->qbnd", probs, v).reshape(s, b, nh * d)
        return ctx @ sd["self_attention.linear_proj.weight"].T

    def M(z):
        gate, up = (z @ sd["mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ sd["mlp.linear_fc2.weight"].T

    def N(z, key):
        return rms_norm(z, sd[key], eps)

    if arch == "pre":
        h = x + a * A(N(x, "input_layernorm.weight"))
        return h + a * M(N(h, "pre_mlp_layernorm.weight"))
    if arch == "post":
        h = N(x + a * A(x), "self_attn_bda.norm.weight")
        return N(h + a * M(h), "mlp_bda.norm.weight")
    if arch == "sandwich":
        h = x + a * N(A(N(x, "input_layernorm.weight")), "self_attn_bda.norm.weight")
        return h + a * N(M(N(h, "pre_mlp_layernorm.weight")), "mlp_bda.norm.weight")
    if arch == "deepnorm":
        c = (2 * L) ** 0.25
        h = N(c * x + a * A(x), "self_attn_bda.norm.weight")
        return N(c * h + a * M(h), "mlp_bda.norm.weight")
    if arch == "lns":
        h = x + a * A(N(x, "input_layernorm.norm.weight") / math.sqrt(l))
        return h + a * M(N(h, "pre_mlp_layernorm.norm.weight") / math.sqrt(l))
    raise AssertionError(arch)


def plain_pre_ln_layer(x, sd, cfg, a):
    return reference_layer("pre", x, sd, cfg, a, l=None)


def run(layer, x, seed=1):
    x = x.clone().requires_grad_(True)
    out, _ = layer(x, attention_mask=None)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * r).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.fixture
def x():
    return torch.randn(S, B, 32, generator=torch.Generator().manual_seed(7))


def test_alpha_one_is_bit_identical_to_vanilla(x):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    cfg = llama_config()
    ours = prores_layer(cfg)
    set_layer_alpha(ours, 1.0)
    vanilla = build_layer(get_gpt_layer_local_spec(normalization="RMSNorm"), cfg)
    vanilla.load_state_dict(ours.state_dict(), strict=True)
    out_o, gx_o, g_o = run(ours, x)
    out_v, gx_v, g_v = run(vanilla, x)
    assert torch.equal(out_o, out_v) and torch.equal(gx_o, gx_v)
    assert g_o.keys() == g_v.keys() and all(torch.equal(g_o[k], g_v[k]) for k in g_o)


def test_alpha_zero_is_identity_with_zero_branch_grads(x):
    layer = prores_layer(llama_config())
    set_layer_alpha(layer, 0.0)
    out, gx, grads = run(layer, x)
    assert torch.equal(out, x)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(gx, r)  # d(sum(out*r))/dx through the skip path only
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads.values()), {
        n: g.abs().max().item() for n, g in grads.items()
    }


@pytest.mark.parametrize("a", [0.37, 0.0, 1.0])
def test_matches_plain_torch_pre_ln(x, a):
    cfg = llama_config()
    layer = prores_layer(cfg)
    set_layer_alpha(layer, a)
    sd = {k: v.detach() for k, v in layer.state_dict().items() if torch.is_tensor(v)}
    out, _ = layer(x, attention_mask=None)
    expected = plain_pre_ln_layer(x, sd, cfg, a)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # The branch is not negligible: alpha visibly changes the output.
    if a != 0.0:
        assert (expected - x).abs().max() > 0.1


def test_alpha_is_a_non_persistent_fp32_buffer_updated_in_place():
    from prores_megatron import ProResBiasDropoutAdd

    layer = prores_layer(llama_config())
    scale = layer.self_attn_bda
    assert isinstance(scale, ProResBiasDropoutAdd)
    ptr = scale.alpha.data_ptr()
    scale.set_alpha(0.25)
    assert scale.alpha.dtype == torch.float32 and scale.alpha.dim() == 0
    assert scale.alpha.data_ptr() == ptr and scale.alpha.item() == 0.25
    assert not any("alpha" in k for k in layer.state_dict())
    assert not any("alpha" in n for n, _ in layer.named_parameters())


def test_unset_alpha_fails_loudly(x):
    layer = prores_layer(llama_config())
    with pytest.raises(RuntimeError, match="set_prores_step"):
        layer(x, attention_mask=None)


ARCHS = ["pre", "post", "sandwich", "deepnorm", "lns"]


def arch_layer(arch, cfg, layer_number=3):
    from prores_megatron import get_prores_layer_spec

    spec = get_prores_layer_spec("local", schedule="linear", warmup_steps=10.0, arch=arch, config=cfg)
    layer = build_layer(spec, cfg, layer_number=layer_number)
    with torch.no_grad():  # distinct norm gains, so a swapped or skipped norm cannot pass
        g = torch.Generator().manual_seed(layer_number)
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.rand(p.shape, generator=g))
    return layer


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("a", [0.37, 0.0, 1.0])
def test_every_arch_matches_the_method_doc(x, arch, a):
    from prores_megatron.core.stepping import set_prores_step

    cfg = llama_config(num_layers=24)
    layer = arch_layer(arch, cfg)
    set_prores_step(layer, 0, check_coverage=False)  # binds LNS's 1/sqrt(l); alpha set below
    set_layer_alpha(layer, a)
    sd = {k: v.detach() for k, v in layer.state_dict().items() if torch.is_tensor(v)}
    out, _ = layer(x, attention_mask=None)
    expected = reference_layer(arch, x, sd, cfg, a, l=layer.layer_number)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_alpha_zero_per_arch(x):
    """alpha = 0: Pre-LN, Sandwich and LNS are the identity; Post-LN is N2(N1(x)), DeepNorm N2(c*N1(c*x))."""
    cfg = llama_config(num_layers=24)
    c = (2 * 24) ** 0.25
    for arch in ARCHS:
        layer = arch_layer(arch, cfg)
        from prores_megatron.core.stepping import set_prores_step

        set_prores_step(layer, 0, check_coverage=False)  # linear schedule at t = 0: alpha = 0
        out, _ = layer(x, attention_mask=None)
        sd = {k: v.detach() for k, v in layer.state_dict().items() if torch.is_tensor(v)}
        n1 = lambda z: rms_norm(z, sd["self_attn_bda.norm.weight"], cfg.layernorm_epsilon)
        n2 = lambda z: rms_norm(z, sd["mlp_bda.norm.weight"], cfg.layernorm_epsilon)
        if arch in ("pre", "sandwich", "lns"):
            assert torch.equal(out, x), arch
        elif arch == "post":
            torch.testing.assert_close(out, n2(n1(x)), rtol=1e-6, atol=1e-6)
            assert not torch.allclose(out, x)
        else:
            torch.testing.assert_close(out, n2(c * n1(c * x)), rtol=1e-6, atol=1e-6)


def test_deepnorm_and_lns_constants():
    from prores_megatron.core.depth_scaling import deepnorm_init_gain, deepnorm_skip_scale, lns_scale

    assert deepnorm_skip_scale(24) == pytest.approx(2.632, abs=5e-4)  # docs/method.md §5.2
    assert deepnorm_init_gain(24) == pytest.approx(0.2686, abs=5e-5)
    assert lns_scale(4) == 0.5 and lns_scale(1) == 1.0
    cfg = llama_config(num_layers=24)
    layer = arch_layer("deepnorm", cfg)
    assert layer.self_attn_bda.skip_scale == layer.mlp_bda.skip_scale == pytest.approx((48) ** 0.25)
    lns = arch_layer("lns", cfg, layer_number=9)
    from prores_megatron.core.stepping import set_prores_step

    set_prores_step(lns, 0, check_coverage=False)
    assert lns.input_layernorm.depth_scale.item() == pytest.approx(1 / 3)
    assert lns.pre_mlp_layernorm.depth_scale.item() == pytest.approx(1 / 3)
    assert not any("depth_scale" in k for k in lns.state_dict())  # fixed, not checkpointed
