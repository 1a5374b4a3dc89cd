"""--prores-init schemes: per-weight statistics on a 24-layer model, and TP2 == TP1 sliced."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prores_megatron.utils import free_port

from models import gpt_model, llama_config

L, H, HEADS, GROUPS, FFN, SIGMA = 24, 128, 4, 2, 256, 0.02
TRUNC = 0.98658  # std of N(0, 1) truncated at +-3


def build(scheme, arch="pre"):
    from prores_megatron import get_prores_layer_spec
    from prores_megatron.core.init_schemes import apply_init

    torch.manual_seed(0)
    cfg = llama_config(num_layers=L, hidden=H, heads=HEADS, groups=GROUPS, ffn=FFN, init_method_std=SIGMA)
    spec = get_prores_layer_spec("local", warmup_steps=1.0, arch=arch, config=cfg)
    model = gpt_model(cfg, spec, vocab=512, seq=16)
    apply_init(model, scheme, sigma=SIGMA, seed=3)
    return model


def close(w, std, name):
    """Sample std within 6 standard errors (1/sqrt(2n) relative) of the formula."""
    tol = 6 / math.sqrt(2 * w.numel())
    got = w.float().std().item()
    assert abs(got / std - 1) < tol, f"{name}: std {got:.6g} vs {std:.6g} (tol {tol:.3%})"


@pytest.mark.usefixtures("mcore_world1")
@pytest.mark.parametrize("scheme", ["megatron", "plain", "scaled", "ds"])
def test_normal_family_statistics(scheme):
    model = build(scheme)
    trunc = 1.0 if scheme == "megatron" else TRUNC
    out_std = {
        "megatron": lambda l: SIGMA / math.sqrt(2 * L),
        "plain": lambda l: SIGMA,
        "scaled": lambda l: SIGMA / math.sqrt(2 * L),
        "ds": lambda l: SIGMA / math.sqrt(2 * l),
    }[scheme]
    close(model.embedding.word_embeddings.weight, SIGMA * trunc, "embedding")
    close(model.output_layer.weight, SIGMA * trunc, "output_layer")
    for layer in model.decoder.layers:
        l = layer.layer_number
        for name, p in layer.named_parameters():
            if "norm" in name:
                assert torch.all(p == 1), name  # norms keep their ones
                continue
            std = (out_std(l) if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else SIGMA) * trunc
            close(p, std, f"layer {l} {name}")
            if scheme != "megatron":
                assert p.abs().max() <= 3 * std / trunc + 1e-7, f"not truncated: layer {l} {name}"
    if scheme == "ds":  # depth really shrinks: layer 24's output projection is 1/sqrt(24) of layer 1's
        s1 = model.decoder.layers[0].self_attention.linear_proj.weight.std().item()
        s24 = model.decoder.layers[23].self_attention.linear_proj.weight.std().item()
        assert s24 / s1 == pytest.approx(1 / math.sqrt(24), rel=0.05)


@pytest.mark.usefixtures("mcore_world1")
@pytest.mark.parametrize("arch", ["deepnorm", "pre"])
def test_deepnorm_statistics(arch):
    """Xavier-normal, gain (8L)^(-1/4) on v, o, gate, up, down; gain 1 on q, k (with ProRes on too)."""
    model = build("deepnorm", arch=arch)
    beta = (8 * L) ** -0.25
    d = H // HEADS
    hpg = HEADS // GROUPS
    xavier = lambda fi, fo, gain=1.0: gain * math.sqrt(2 / (fi + fo))
    close(model.embedding.word_embeddings.weight, SIGMA * TRUNC, "embedding")
    for layer in model.decoder.layers:
        qkv = layer.self_attention.linear_qkv.weight.view(GROUPS, hpg + 2, d, H)
        close(qkv[:, :hpg], xavier(H, HEADS * d), "q")
        close(qkv[:, hpg], xavier(H, GROUPS * d), "k")
        close(qkv[:, hpg + 1], xavier(H, GROUPS * d, beta), "v")
        close(layer.self_attention.linear_proj.weight, xavier(HEADS * d, H, beta), "o")
        gate, up = layer.mlp.linear_fc1.weight.chunk(2, 0)
        close(gate, xavier(H, FFN, beta), "gate")
        close(up, xavier(H, FFN, beta), "up")
        close(layer.mlp.linear_fc2.weight, xavier(FFN, H, beta), "down")


@pytest.mark.usefixtures("mcore_world1")
def test_unknown_scheme_is_refused():
    from prores_megatron.core.init_schemes import apply_init

    with pytest.raises(ValueError, match="init scheme='xavier'.*megatron, plain, scaled, ds, deepnorm"):
        apply_init([], "xavier")


def test_tp2_weights_equal_tp1_weights(tmp_path):
    """Every scheme (and megatron-core's own init with --use-cpu-initialization): TP2 == TP1."""
    dumps = _run_init_worker(tmp_path, "tp", (1, 2))
    one, two = dumps[1], dumps[2]
    assert one.keys() == two.keys()
    for scheme in one:
        assert one[scheme].keys() == two[scheme].keys()
        for name, w in one[scheme].items():
            assert torch.equal(w, two[scheme][name]), (scheme, name)
    # The schemes really differ (the comparison is not between identical defaults).
    proj = "decoder.layers.1.self_attention.linear_proj.weight"  # l=2: scaled and ds differ
    stds = {s: one[s][proj].std().item() for s in one}
    assert len({round(v, 6) for v in stds.values()}) == len(stds), stds


def _run_init_worker(tmp_path, mode, sizes):
    worker = Path(__file__).resolve().parents[1] / "init_worker.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = {}
    for ws in sizes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ws),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(worker), str(tmp_path / f"{mode}{ws}.pt"), mode]
        procs[ws] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for ws, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    return {ws: torch.load(tmp_path / f"{mode}{ws}.pt") for ws in sizes}


def test_ep2_expert_weights_equal_ep1(tmp_path):
    """MoE (4 routed experts, a shared expert): every --prores-init draws expert e the same on
    EP1 and EP2 (keyed by the global expert id), and depth-scales expert down-projections."""
    dumps = _run_init_worker(tmp_path, "ep", (1, 2))
    one, two = dumps[1], dumps[2]
    expert = "decoder.layers.{l}.mlp.experts.{e}.linear_fc2.weight"
    for scheme in ("plain", "scaled", "ds", "deepnorm"):
        assert one[scheme].keys() == two[scheme].keys()
        assert expert.format(l=0, e=3) in one[scheme]  # the experts are named by global id
        for name, w in one[scheme].items():
            assert torch.equal(w, two[scheme][name]), (scheme, name)
        # Four different experts, not one expert drawn four times.
        assert len({one[scheme][expert.format(l=1, e=e)].sum().item() for e in range(4)}) == 4
    # megatron-core's own init (use_cpu_initialization) draws each rank's local experts from the
    # same stream: EP2's experts 2, 3 repeat experts 0, 1 and differ from EP1's.
    assert not torch.equal(one["megatron"][expert.format(l=0, e=2)], two["megatron"][expert.format(l=0, e=2)])
    # ds: the down-projections of routed and shared experts of layer l have std sigma/sqrt(2l).
    for l in range(1, 5):
        for name in (expert.format(l=l - 1, e=e) for e in range(4)):
            close(one["ds"][name], 0.02 / math.sqrt(2 * l) * TRUNC, name)
        shared = f"decoder.layers.{l - 1}.mlp.shared_experts.linear_fc2.weight"
        close(one["ds"][shared], 0.02 / math.sqrt(2 * l) * TRUNC, shared)
        up = f"decoder.layers.{l - 1}.mlp.experts.0.linear_fc1.weight"
        close(one["ds"][up], 0.02 * TRUNC, up)  # not an output projection: sigma


def test_expert_weights_are_keyed_by_global_id_in_every_expert_module():
    """SequentialMLP's local_experts.<i> and TE's grouped weight<i> name one expert the same way."""
    from prores_megatron.core.init_schemes import _role_and_key

    first = 4  # this rank holds experts 4.. (EP rank 1 of 2 with 4 local experts)
    assert _role_and_key("mlp.experts.local_experts.3.linear_fc2.weight", first) == \
        ("out", "mlp.experts.7.linear_fc2.weight")
    assert _role_and_key("mlp.experts.linear_fc2.weight3", first) == ("out", "mlp.experts.7.linear_fc2.weight")
    assert _role_and_key("mlp.experts.linear_fc1.weight0", first) == ("fc1", "mlp.experts.4.linear_fc1.weight")
    assert _role_and_key("mlp.shared_experts.linear_fc2.weight", first)[0] == "out"
    assert _role_and_key("mlp.router.weight", first)[0] == "router"
    assert _role_and_key("mlp.shared_experts.gate_weight", first)[0] is None  # refused by apply_init
