"""Spec transformation, set_prores_step on whole models, the coverage guard, checkpoint interchange."""

import dataclasses

import pytest
import torch

from models import TE, gpt_model, llama_config

pytestmark = pytest.mark.usefixtures("mcore_world1")

L = 6


def prores_spec(schedule="linear", T=2.0):
    from prores_megatron import get_prores_layer_spec

    return get_prores_layer_spec("local", schedule=schedule, warmup_steps=T)


def build(spec, num_layers=L, seed=0):
    torch.manual_seed(seed)
    return gpt_model(llama_config(num_layers=num_layers), spec)


def scales_by_layer(model):
    from prores_megatron import ProResBiasDropoutAdd

    return {
        layer.layer_number: [m for m in layer.modules() if isinstance(m, ProResBiasDropoutAdd)]
        for layer in model.decoder.layers
    }


# ---- spec transformation -------------------------------------------------------------------


def test_with_prores_swaps_only_bias_dropout_add_and_copies():
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityFuncOp

    from prores_megatron import ProResBiasDropoutAdd, with_prores

    base = get_gpt_layer_local_spec(normalization="RMSNorm")
    out = with_prores(base, schedule="sqrt", warmup_steps=3)
    for field in ("self_attn_bda", "mlp_bda"):
        assert getattr(base.submodules, field) is get_bias_dropout_add  # input untouched
        bda = getattr(out.submodules, field)
        assert bda.module is ProResBiasDropoutAdd
        assert bda.params == {"schedule": "sqrt", "warmup_steps": 3}
    assert out.submodules.cross_attn_bda is IdentityFuncOp  # absent branch left alone
    assert out.submodules.self_attention is not base.submodules.self_attention  # a deep copy
    # Applying twice re-parameterises instead of nesting.
    again = with_prores(out, schedule="linear", warmup_steps=5)
    assert again.submodules.mlp_bda.params == {"schedule": "linear", "warmup_steps": 5}


def test_with_prores_on_block_submodules_and_absent_branch():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from prores_megatron import ProResBiasDropoutAdd, with_prores

    attn_only = get_gpt_layer_local_spec(normalization="RMSNorm")
    attn_only = dataclasses.replace(
        attn_only,
        submodules=dataclasses.replace(
            attn_only.submodules, mlp=IdentityOp, pre_mlp_layernorm=IdentityOp, mlp_bda=IdentityFuncOp
        ),
    )
    block = TransformerBlockSubmodules(
        layer_specs=[get_gpt_layer_local_spec(normalization="RMSNorm"), attn_only], layer_norm=None
    )
    out = with_prores(block, schedule="linear", warmup_steps=1)
    assert isinstance(out, TransformerBlockSubmodules) and out is not block
    assert out.layer_specs[0].submodules.mlp_bda.module is ProResBiasDropoutAdd
    assert out.layer_specs[1].submodules.self_attn_bda.module is ProResBiasDropoutAdd
    assert out.layer_specs[1].submodules.mlp_bda is IdentityFuncOp


def test_with_prores_refuses_what_it_cannot_scale():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityFuncOp

    from prores_megatron import with_prores

    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attn_bda = IdentityFuncOp
    spec.submodules.mlp_bda = IdentityFuncOp
    with pytest.raises(ValueError, match="silent no-op"):
        with_prores(spec, warmup_steps=1)
    with pytest.raises(TypeError, match="expected a layer ModuleSpec"):
        with_prores(object())
    with pytest.raises(ValueError, match="schedule='fix_l'"):
        with_prores(get_gpt_layer_local_spec(), schedule="fix_l")
    with pytest.raises(ValueError, match="warmup_steps=None"):
        with_prores(get_gpt_layer_local_spec(), schedule="linear")


def _mlp_fc1(spec):
    mlp = spec.submodules.mlp
    sub = mlp.keywords["submodules"] if hasattr(mlp, "keywords") else mlp.submodules
    return sub.linear_fc1


def test_transformer_engine_unavailable_on_cpu_is_a_clear_error():
    from prores_megatron import get_prores_layer_spec
    from prores_megatron.core import compat

    if compat.have_transformer_engine():
        pytest.skip("Transformer Engine is importable here")
    with pytest.raises(ImportError, match="--transformer-impl local"):
        get_prores_layer_spec("transformer_engine", warmup_steps=1)
    with pytest.raises(ValueError, match="transformer_impl='inference_optimized'.*local, transformer_engine"):
        get_prores_layer_spec("inference_optimized", warmup_steps=1)


@pytest.mark.parametrize("arch", ["pre", "post", "sandwich", "deepnorm", "lns"])
def test_transformer_engine_spec_structure(fake_te, arch):
    """TE variants: the fused LayerNorm-linear stays only where the arch has that pre-norm."""
    from megatron.core.transformer.identity_op import IdentityOp

    from prores_megatron import ProResBiasDropoutAdd, get_prores_layer_spec
    from prores_megatron.core.residual_scale import (
        DepthScaledNorm,
        ProResPostNormBiasDropoutAdd,
        ProResSandwichBiasDropoutAdd,
    )

    cfg = llama_config(num_layers=24)
    spec = get_prores_layer_spec("transformer_engine", schedule="linear-square", warmup_steps=4, arch=arch, config=cfg)
    sub = spec.submodules
    qkv = sub.self_attention.submodules.linear_qkv
    assert sub.self_attention.submodules.core_attention is TE.TEDotProductAttention
    assert sub.self_attention.submodules.linear_proj is TE.TERowParallelLinear
    bda = {
        "pre": ProResBiasDropoutAdd, "lns": ProResBiasDropoutAdd, "sandwich": ProResSandwichBiasDropoutAdd,
        "post": ProResPostNormBiasDropoutAdd, "deepnorm": ProResPostNormBiasDropoutAdd,
    }[arch]
    for field in ("self_attn_bda", "mlp_bda"):
        assert getattr(sub, field).module is bda
        assert getattr(sub, field).params["schedule"] == "linear-square"
    if arch in ("pre", "sandwich"):  # pre-norm present: TE keeps it fused into the linears
        assert qkv is TE.TELayerNormColumnParallelLinear
        assert _mlp_fc1(spec) is TE.TELayerNormColumnParallelLinear
    else:  # no pre-norm (post, deepnorm) or a scaled one (lns): the plain TE linears
        assert qkv is TE.TEColumnParallelLinear
        assert _mlp_fc1(spec) is TE.TEColumnParallelLinear
    if arch in ("post", "deepnorm"):
        assert sub.input_layernorm is IdentityOp and sub.pre_mlp_layernorm is IdentityOp
        assert sub.self_attn_bda.params["norm"] is TE.TENorm
        assert sub.self_attn_bda.params["skip_scale"] == (pytest.approx(48 ** 0.25) if arch == "deepnorm" else 1.0)
    if arch == "sandwich":
        assert sub.mlp_bda.params["norm"] is TE.TENorm
    if arch == "lns":
        for norm in (sub.input_layernorm, sub.pre_mlp_layernorm):
            assert issubclass(norm, DepthScaledNorm) and norm.norm_class is TE.TENorm
        assert sub.sharded_state_dict_keys_map["input_layernorm.norm."] == "self_attention.linear_qkv.layer_norm_"


def test_archs_refuse_what_they_cannot_express():
    from prores_megatron import get_prores_layer_spec

    with pytest.raises(ValueError, match="arch='post' builds norms of its own and needs the TransformerConfig"):
        get_prores_layer_spec("local", warmup_steps=1, arch="post")
    with pytest.raises(ValueError, match="arch='sideways'.*pre, post, sandwich, deepnorm, lns"):
        get_prores_layer_spec("local", warmup_steps=1, arch="sideways")
    with pytest.raises(ValueError, match="dense MLPs.*--num-experts"):
        get_prores_layer_spec("local", warmup_steps=1, arch="lns", num_experts=4, config=llama_config())


# ---- set_prores_step ------------------------------------------------------------------------


class Wrapper(torch.nn.Module):
    """Stands in for DDP / Float16Module: the model sits under .module."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("schedule", ["linear", "reverse", "stagewise-0", "fix-inv-sqrt-layer", "none"])
def test_set_prores_step_writes_the_schedule(schedule):
    from prores_megatron import alpha_table, set_prores_step

    T = 1.5
    model = build(prores_spec(schedule, T))
    wrapped = [Wrapper(model)]
    for step in (0, 1, 4, 100):
        set_prores_step(wrapped, step)
        expected = alpha_table(schedule, step, T, L)
        for l, scales in scales_by_layer(model).items():
            assert len(scales) == 2
            for s in scales:
                assert s.alpha.item() == pytest.approx(expected[l - 1], abs=1e-7)
                assert s.alpha.item() == torch.tensor(expected[l - 1], dtype=torch.float32).item()


def test_set_prores_step_is_idempotent_and_in_place():
    from prores_megatron import set_prores_step

    model = build(prores_spec())
    set_prores_step(model, 3)
    ptrs = {id(s): s.alpha.data_ptr() for ss in scales_by_layer(model).values() for s in ss}
    before = [s.alpha.clone() for ss in scales_by_layer(model).values() for s in ss]
    set_prores_step(model, 3)
    set_prores_step(model, 3)
    after = [s.alpha for ss in scales_by_layer(model).values() for s in ss]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert ptrs == {id(s): s.alpha.data_ptr() for ss in scales_by_layer(model).values() for s in ss}


def test_alpha_zero_everywhere_makes_the_trunk_an_identity():
    from prores_megatron import set_prores_step

    model = build(prores_spec())
    set_prores_step(model, 0)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, 16)
    captured = {}
    model.decoder.final_layernorm.register_forward_hook(lambda m, i, o: captured.update(inp=i[0]))
    model(tokens, positions, None)
    emb = model.embedding(tokens, positions)
    assert torch.equal(captured["inp"], emb)  # decoder input reaches the final norm untouched


def test_model_without_prores_is_refused():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from prores_megatron import set_prores_step

    model = build(get_gpt_layer_local_spec(normalization="RMSNorm"))
    with pytest.raises(ValueError, match="no ProRes residual scale.*silently do nothing"):
        set_prores_step(model, 0)


def test_coverage_guard_fires_on_a_missing_layer():
    from prores_megatron import ProResCoverageError, set_prores_step

    model = build(prores_spec())
    del model.decoder.layers[2]  # global layer 3 is gone, as with a mis-set pipeline split
    with pytest.raises(ProResCoverageError, match=r"missing \[3\].*--num-layers.*--pipeline-model-parallel-layout"):
        set_prores_step(model, 0)
    # ...and on a duplicated one.
    model = build(prores_spec())
    model.decoder.layers[1].layer_number = 1
    with pytest.raises(ProResCoverageError, match=r"missing \[2\], duplicated or out of range \[1\]"):
        set_prores_step(model, 0)


def test_forgotten_set_prores_step_fails_loudly():
    model = build(prores_spec())
    tokens = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(RuntimeError, match="set_prores_step"):
        model(tokens, torch.arange(16)[None], None)


# ---- checkpoints -----------------------------------------------------------------------------


def test_vanilla_and_prores_checkpoints_load_into_each_other(tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    vanilla = build(get_gpt_layer_local_spec(normalization="RMSNorm"), seed=1)
    prores = build(prores_spec(), seed=2)
    assert vanilla.state_dict().keys() == prores.state_dict().keys()
    assert vanilla.sharded_state_dict().keys() == prores.sharded_state_dict().keys()
    prores.load_state_dict(vanilla.state_dict(), strict=True)
    vanilla.load_state_dict(prores.state_dict(), strict=True)

    # Through megatron-core's torch_dist format, both ways.
    src, dst = build(prores_spec(), seed=3), build(get_gpt_layer_local_spec(normalization="RMSNorm"), seed=4)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    dist_checkpointing.save(src.sharded_state_dict(), str(tmp_path / "a"))
    dst.load_state_dict(dist_checkpointing.load(dst.sharded_state_dict(), str(tmp_path / "a")), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()) if torch.is_tensor(a))
    back = build(prores_spec(), seed=5)
    dist_checkpointing.save(dst.sharded_state_dict(), str(tmp_path / "b"))
    back.load_state_dict(dist_checkpointing.load(back.sharded_state_dict(), str(tmp_path / "b")), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), back.state_dict().values()) if torch.is_tensor(a))


def test_set_prores_step_refuses_to_run_inside_a_cuda_graph_capture(monkeypatch):
    """An alpha write captured in a graph would replay the capture step's alpha forever."""
    from prores_megatron import set_prores_step

    model = build(prores_spec())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="while a CUDA graph is being captured"):
        set_prores_step(model, 3, check_coverage=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    set_prores_step(model, 3, check_coverage=False)  # outside a capture it writes alpha
    assert scales_by_layer(model)[L][0].alpha.item() == pytest.approx(min(3 / (2.0 * L), 1.0))
