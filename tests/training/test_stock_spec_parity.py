"""ProRes builds exactly the model stock Megatron-LM builds for the same command line, plus alpha.

Each case is a Megatron-LM command line, parsed by Megatron-LM's own parser and validator with the
``--prores-*`` flags added, and built at world size 1 three times from one seed: stock (no layer
spec given, so Megatron-LM's ``GPTModelBuilder`` picks its own), ProRes with ``--prores-schedule
none`` and ProRes with ``linear``. Expectations, derived by hand from the flags:
- the same parameters (names, shapes, initial values) in all three builds;
- the same module classes, except that each decoder layer gains two residual modules exactly where
  the stock layer calls megatron-core's bias-dropout-add (MTP layers: none);
- the MoE layers where ``--moe-layer-freq`` puts them;
- ``none`` trains bit for bit like stock for two iterations; ``linear`` does not.
"""

import sys

import pytest
import torch

from models import TE

L = 4
BASE = [
    "--num-layers", str(L), "--hidden-size", "32", "--ffn-hidden-size", "48", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--seq-length", "16", "--max-position-embeddings", "16",
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
    "--init-method-std", "0.2", "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
    "--lr", "1e-3", "--distributed-backend", "gloo", "--transformer-impl", "local", "--use-cpu-initialization",
    "--no-rope-fusion", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion", "--no-bias-swiglu-fusion",
    "--no-bias-dropout-fusion", "--no-masked-softmax-fusion", "--mock-data", "--tokenizer-type", "NullTokenizer",
    "--vocab-size", "127", "--eval-interval", "100",
]
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "24", "--moe-aux-loss-coeff", "0.01"]
CASES = {
    "dense_gqa": [],
    "moe_layer_freq": [*MOE, "--moe-layer-freq", "[0,1,0,1]"],
    "moe_shared_experts": [*MOE, "--moe-shared-expert-intermediate-size", "32"],
    "qk_layernorm": ["--qk-layernorm"],
    "qk_l2_norm": ["--qk-l2-norm"],
    "mtp": ["--mtp-num-layers", "1"],
}
MOE_LAYERS = {"moe_layer_freq": {2, 4}, "moe_shared_experts": {1, 2, 3, 4}}  # 1-based, from the flags


def parse(monkeypatch, flags, prores):
    from megatron.training.arguments import parse_args, validate_args

    from prores_megatron.training.arguments import add_prores_args, validate_prores_args

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *BASE, *flags, *prores])
    args = parse_args(add_prores_args)
    validate_args(args, {})
    validate_prores_args(args)
    args.padded_vocab_size = 128  # 127 + NullTokenizer's EOD, padded to 128 (set by the tokenizer in a run)
    return args


def build(args, prores: bool, seed=1):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.training.argument_utils import gpt_config_from_args

    from prores_megatron.training.model_config import prores_layer_spec_fn

    cfg = gpt_config_from_args(args)
    if prores:
        cfg.transformer_layer_spec = prores_layer_spec_fn(args)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return cfg.get_builder_cls()(cfg).build_model(ProcessGroupCollection.use_mpu_process_groups(),
                                                  pre_process=True, post_process=True)


def classes(model):
    return {name: type(m) for name, m in model.named_modules()}


def two_iterations(model, step_fn):
    """Losses of two Adam steps on a fixed batch (alpha set for t = 0, 1 when ``step_fn``)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 127, (2, 16), generator=g)
    positions = torch.arange(16).unsqueeze(0).expand(2, -1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for t in range(2):
        if step_fn:
            step_fn(model, t)
        opt.zero_grad()
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.usefixtures("mcore_world1")
@pytest.mark.parametrize("case", list(CASES))
def test_prores_builds_the_stock_model_plus_alpha(monkeypatch, case):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from prores_megatron import set_prores_step
    from prores_megatron.core.residual_scale import ProResBiasDropoutAdd

    flags = CASES[case]
    stock = build(parse(monkeypatch, flags, ["--prores-schedule", "none"]), prores=False)
    plain = build(parse(monkeypatch, flags, ["--prores-schedule", "none"]), prores=True)
    on_args = parse(monkeypatch, flags, ["--prores-schedule", "linear", "--prores-warmup-steps", "2"])
    on = build(on_args, prores=True)

    expected_residuals = {f"decoder.layers.{i}.{f}" for i in range(L) for f in ("self_attn_bda", "mlp_bda")}
    reference = stock.state_dict()
    for model in (plain, on):
        got = classes(model)
        residuals = {n for n, c in got.items() if issubclass(c, ProResBiasDropoutAdd)}
        assert residuals == expected_residuals, sorted(residuals ^ expected_residuals)
        assert {n: c for n, c in got.items() if n not in residuals} == classes(stock)
        state = model.state_dict()
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            if torch.is_tensor(value):
                assert torch.equal(state[key], value), key
    moe = {int(n.split(".")[2]) + 1 for n, c in classes(stock).items()
           if n.startswith("decoder.layers.") and n.count(".") == 3 and issubclass(c, MoELayer)}
    assert moe == MOE_LAYERS.get(case, set())
    if case == "mtp":
        assert any(n.startswith("mtp.") for n in classes(stock))  # MTP was built, and stays unscaled

    ref_losses = two_iterations(stock, None)
    assert two_iterations(plain, set_prores_step) == ref_losses  # bit for bit
    assert two_iterations(on, set_prores_step)[0] != ref_losses[0]  # alpha = 0 at t = 0: a different model
    print(f"\n{case}: stock losses {ref_losses}")


@pytest.mark.parametrize("extra", [["--qk-layernorm"], ["--qk-l2-norm"], ["--use-te-activation-func"]],
                         ids=["qk_layernorm", "qk_l2_norm", "te_activation_func"])
def test_transformer_engine_spec_is_the_stock_one_plus_alpha(monkeypatch, fake_te, extra):
    """--transformer-impl transformer_engine through a stand-in TE provider: Megatron-LM's own TE
    spec for the flags, with only the two residual adds replaced."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.models.gpt import default_layer_spec

    from prores_megatron.core.residual_scale import ProResBiasDropoutAdd
    from prores_megatron.training.model_config import prores_layer_spec_fn

    flags = ["--transformer-impl", "transformer_engine", *extra]
    args = parse(monkeypatch, flags, ["--prores-schedule", "linear", "--prores-warmup-steps", "2"])
    cfg = gpt_config_from_args(args)
    stock, prores = default_layer_spec(cfg, None), prores_layer_spec_fn(args)(cfg)
    assert stock.submodules.self_attention.submodules.linear_qkv is TE.TELayerNormColumnParallelLinear
    if extra == ["--qk-layernorm"]:
        assert stock.submodules.self_attention.submodules.q_layernorm is TE.TENorm
    for field in ("self_attn_bda", "mlp_bda"):
        assert getattr(stock.submodules, field) is get_bias_dropout_add
        assert getattr(prores.submodules, field).module is ProResBiasDropoutAdd
    rest = [f for f in stock.submodules.__dataclass_fields__ if f not in ("self_attn_bda", "mlp_bda")]
    for field in rest:
        assert _shape(getattr(prores.submodules, field)) == _shape(getattr(stock.submodules, field)), field
    assert prores.module is stock.module


def _shape(spec):
    """A comparable picture of a spec: classes, params and submodules (partials unwrapped)."""
    import dataclasses
    import functools

    if isinstance(spec, functools.partial):
        return ("partial", _shape(spec.func), tuple(sorted((k, _shape(v)) for k, v in spec.keywords.items())))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return (type(spec), tuple((f.name, _shape(getattr(spec, f.name))) for f in dataclasses.fields(spec)))
    if isinstance(spec, dict):
        return tuple(sorted((k, _shape(v)) for k, v in spec.items()))
    if isinstance(spec, (list, tuple)):
        return tuple(_shape(v) for v in spec)
    return spec


@pytest.mark.usefixtures("mcore_world1")
@pytest.mark.parametrize("aux", ["0.01", "0"])
def test_moe_at_alpha_zero_only_the_router_learns_from_the_aux_loss(monkeypatch, aux):
    """alpha = 0 (t = 0): experts (routed and shared), attention and the attention norm get exactly
    zero gradient. The router still learns from the load-balancing loss (and, through the router's
    input, the pre-MLP norm), and from nothing when the loss's coefficient is 0."""
    from prores_megatron import set_prores_step

    flags = [*MOE, "--moe-shared-expert-intermediate-size", "32", "--moe-aux-loss-coeff", aux]
    model = build(parse(monkeypatch, flags, ["--prores-schedule", "linear", "--prores-warmup-steps", "2"]), True)
    set_prores_step(model, 0)
    tokens = torch.randint(0, 127, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).unsqueeze(0).expand(2, -1)
    model(tokens, positions, None, labels=tokens).float().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("decoder.layers.")}
    aux_path = {n: g for n, g in grads.items() if ".mlp.router." in n or ".pre_mlp_layernorm." in n}
    assert len(aux_path) == 2 * L and sum(".mlp.experts." in n for n in grads) >= 8 * L
    for name, g in grads.items():
        if name not in aux_path:
            assert g is None or torch.count_nonzero(g) == 0, name
    assert all((torch.count_nonzero(g) > 0) == (aux != "0") for g in aux_path.values()), aux
    assert model.output_layer.weight.grad.abs().sum() > 0  # the embedding -> head path learns


@pytest.mark.usefixtures("mcore_world1")
def test_without_prores_flags_the_entry_point_builds_and_trains_the_stock_model(monkeypatch):
    """ProRes is opt-in: a command line with no --prores-* flag goes through the entry point's
    configure_model_config / attach_monitor (as pretrain_gpt.main and the patch call them) and comes
    out untouched: no layer spec (Megatron-LM's builder picks its own), no hooks, no wrapped loop
    functions. Built from one seed it equals Megatron-LM's own build (no ProRes module anywhere) and
    trains bit for bit like it."""
    from megatron.training import training
    from megatron.training.argument_utils import gpt_config_from_args

    from prores_megatron.core.residual_scale import ProResBiasDropoutAdd
    from prores_megatron.training.model_config import attach_monitor, configure_model_config

    args = parse(monkeypatch, [], [])
    assert args.prores_enabled is False
    loop = {name: getattr(training, name) for name in ("train_step", "evaluate_and_print_results",
                                                       "load_checkpoint", "training_log")}
    cfg = gpt_config_from_args(args)
    hooks = (list(cfg.pre_wrap_hooks), list(cfg.post_wrap_hooks))
    assert configure_model_config(cfg, args) is cfg and attach_monitor(cfg, args) is None
    assert cfg.transformer_layer_spec is None and (cfg.pre_wrap_hooks, cfg.post_wrap_hooks) == hooks
    assert all(getattr(training, name) is fn for name, fn in loop.items())

    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(1)
    model_parallel_cuda_manual_seed(1, force_reset_rng=True)
    entry = cfg.get_builder_cls()(cfg).build_model(ProcessGroupCollection.use_mpu_process_groups(),
                                                   pre_process=True, post_process=True)
    stock = build(parse(monkeypatch, [], []), prores=False)
    assert classes(entry) == classes(stock)
    assert not any(isinstance(m, ProResBiasDropoutAdd) for m in entry.modules())
    for key, value in stock.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(entry.state_dict()[key], value), key
    assert two_iterations(entry, None) == two_iterations(stock, None)  # bit for bit
