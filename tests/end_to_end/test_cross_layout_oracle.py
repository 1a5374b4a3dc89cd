"""Deterministic cross-layout oracle (docs/megatron.md §5).

Three torchrun launches of tests/oracle_worker.py (world sizes 1, 2 and 4, started concurrently;
each process runs all of its parallel configs) build the same tiny Llama-style GPT with weights keyed
by GLOBAL layer number, set ProRes alpha with ``set_prores_step`` and run megatron-core's
``forward_backward_func``. Every pipeline split (PP, VPP, uneven, explicit layout, full recompute)
must reproduce the world-size-1 loss and per-layer grad^2 bit for bit; tensor parallelism to 1e-6.
This is the end-to-end check that alpha(l, t) reaches the right GLOBAL layer on every rank.
"""

import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prores_megatron import alpha_table
from prores_megatron.utils import free_port

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "oracle_worker.py"
NUM_LAYERS = 8
LAUNCH_TIMEOUT_S = 600

# Must match PRORES_CASES in oracle_worker.py: case -> (schedule, warmup_steps, step).
CASES = {
    "linear": ("linear", 1.0, 4),  # alpha 1,1,1,1,.8,.667,.571,.5
    "stagewise": ("stagewise-0", 2.0, 9),  # alpha 1,1,1,1,.5,0,0,0
    "stagewise_alpha1": ("stagewise-0", 2.0, 16),  # alpha 1 everywhere (same model as "stagewise")
}

REFERENCE = "ws1_reference"
# The other residual architectures run linear, T=1, t=4 at world size 1, TP2 and PP2.
ARCHS = ["post", "sandwich", "deepnorm", "lns"]
ARCH_CASES = [f"arch_{a}" for a in ARCHS]
LAUNCHES = {
    1: [dict(name=REFERENCE, tp=1, pp=1, vanilla=True, archs=ARCHS, monitor=True)],
    2: [
        dict(name="tp2", tp=2, pp=1, archs=ARCHS, monitor=True),
        dict(name="pp2", tp=1, pp=2, archs=ARCHS, monitor=True),
        dict(name="pp2_vpp2", tp=1, pp=2, vpp=2),
        dict(name="pp2_uneven_first3_last5", tp=1, pp=2, first=3, last=5),
        dict(name="pp2_vpp2_layout", tp=1, pp=2, layout="Et*3|t*3|t|tL"),
        dict(name="pp2_full_recompute", tp=1, pp=2, recompute=True),
    ],
    4: [
        dict(name="tp2_pp2", tp=2, pp=2),
        dict(name="tp2_pp2_vpp2", tp=2, pp=2, vpp=2),
    ],
}
ALL_CONFIGS = [c for cfgs in LAUNCHES.values() for c in cfgs]
EXACT_CONFIGS = [c["name"] for c in ALL_CONFIGS if c["tp"] == 1 and c["name"] != REFERENCE]
TP_CONFIGS = [c["name"] for c in ALL_CONFIGS if c["tp"] > 1]

# Global layers per pipeline rank, one list per virtual chunk (docs/megatron.md §2 table).
EXPECTED_LAYERS = {
    REFERENCE: [[list(range(1, 9))]],
    "tp2": [[list(range(1, 9))]],
    "pp2": [[[1, 2, 3, 4]], [[5, 6, 7, 8]]],
    "pp2_vpp2": [[[1, 2], [5, 6]], [[3, 4], [7, 8]]],
    "pp2_uneven_first3_last5": [[[1, 2, 3]], [[4, 5, 6, 7, 8]]],
    "pp2_vpp2_layout": [[[1, 2, 3], [7]], [[4, 5, 6], [8]]],
    "pp2_full_recompute": [[[1, 2, 3, 4]], [[5, 6, 7, 8]]],
    "tp2_pp2": [[[1, 2, 3, 4]], [[5, 6, 7, 8]]],
    "tp2_pp2_vpp2": [[[1, 2], [5, 6]], [[3, 4], [7, 8]]],
}

TP_TOL = 1e-6  # relative and absolute


def _launch(world_size, configs, workdir):
    cfg_path = workdir / f"configs_ws{world_size}.json"
    cfg_path.write_text(json.dumps(configs))
    out = workdir / f"result_ws{world_size}.json"
    log = open(workdir / f"log_ws{world_size}.txt", "w")
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("PYTHONWARNINGS", "ignore")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1",
        "--nproc_per_node", str(world_size),
        "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()),
        str(WORKER), "--configs", str(cfg_path), "--out", str(out),
    ]
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, out, log


@pytest.fixture(scope="session")
def oracle(tmp_path_factory):
    """Run the three launches once (concurrently) and return {config name: result}."""
    workdir = tmp_path_factory.mktemp("cross_layout_oracle")
    t0 = time.perf_counter()
    launches = {ws: _launch(ws, cfgs, workdir) for ws, cfgs in LAUNCHES.items()}
    failures = []
    for ws, (proc, out, log) in launches.items():
        try:
            rc = proc.wait(timeout=LAUNCH_TIMEOUT_S - (time.perf_counter() - t0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
        log.close()
        if rc != 0 or not out.exists():
            tail = (workdir / f"log_ws{ws}.txt").read_text()[-6000:]
            failures.append(f"--- world size {ws}: rc={rc}\n{tail}")
    wall = time.perf_counter() - t0
    if failures:
        pytest.fail("oracle worker launch failed:\n" + "\n".join(failures))

    results, meta = {}, {}
    for ws, (_, out, _) in launches.items():
        data = json.loads(out.read_text())
        meta[ws] = data["meta"]
        results.update(data["configs"])

    ref = results[REFERENCE]["cases"]
    print(f"\n[oracle] 3 torchrun launches (world sizes 1, 2, 4; concurrent): {wall:.1f} s wall; "
          + ", ".join(f"ws{ws} worker {m['total_seconds']:.1f} s" for ws, m in meta.items())
          + f"; megatron-core {meta[1]['megatron_core']}, torch {meta[1]['torch']}")
    for case in list(CASES) + ["vanilla"] + ARCH_CASES:
        print(f"[oracle] case {case}: reference loss {ref[case]['loss']!r}")
        print("[oracle]   reference per-layer grad^2: "
              + " ".join(f"{v:.6g}" for v in ref[case]["layer_grad_sq"].values()))
        if case == "vanilla":
            continue
        for name, res in results.items():
            if name == REFERENCE or case not in res["cases"]:
                continue
            c = res["cases"][case]
            dl = abs(c["loss"] - ref[case]["loss"])
            dg = max(abs(c["layer_grad_sq"][k] - v) for k, v in ref[case]["layer_grad_sq"].items())
            print(f"[oracle]   {name:26s} loss {c['loss']!r:22s} |dloss| {dl:.3g}  max|d grad^2| {dg:.3g}")
    return {"results": results, "meta": meta, "wall": wall}


def _results(oracle):
    return oracle["results"]


def _rel_abs_dev(a, b):
    d = abs(a - b)
    return d, d / max(abs(b), 1e-300)


def test_worker_ran_all_configs_core_only(oracle):
    res = _results(oracle)
    assert sorted(res) == sorted(c["name"] for c in ALL_CONFIGS)
    for ws, m in oracle["meta"].items():
        assert m["world_size"] == ws
    for cfg in ALL_CONFIGS:
        cases = res[cfg["name"]]["cases"]
        expected = set(CASES) | ({"vanilla"} if cfg.get("vanilla") else set())
        expected |= {f"arch_{a}" for a in cfg.get("archs", [])}
        expected |= {"monitor"} if cfg.get("monitor") else set()
        assert set(cases) == expected, cfg["name"]
        for case_name, case in cases.items():
            if case_name == "monitor":
                continue
            assert len(case["mb_losses"]) == 4
            assert all(math.isfinite(x) for x in case["mb_losses"])


@pytest.mark.parametrize("name", [c["name"] for c in ALL_CONFIGS])
def test_every_global_layer_built_exactly_once(oracle, name):
    res = _results(oracle)[name]
    tp = res["parallel"]["tp"]
    ranks = res["ranks"]
    for tp_rank in range(tp):
        mine = sorted((r for r in ranks if r["tp_rank"] == tp_rank), key=lambda r: r["pp_rank"])
        flat = sorted(l for r in mine for chunk in r["layers"] for l in chunk)
        assert flat == list(range(1, NUM_LAYERS + 1)), (name, tp_rank, [r["layers"] for r in mine])
        assert [r["layers"] for r in mine] == EXPECTED_LAYERS[name], name
    for case_name, case in res["cases"].items():
        if case_name == "monitor":
            continue
        assert sorted(case["layer_grad_sq"], key=int) == [str(l) for l in range(1, NUM_LAYERS + 1)]


@pytest.mark.parametrize("name", [c["name"] for c in ALL_CONFIGS])
def test_alpha_reaches_global_layer(oracle, name):
    import torch

    for case, (schedule, warmup, step) in CASES.items():
        got = _results(oracle)[name]["cases"][case]
        assert got["step"] == step
        table = alpha_table(schedule, step, warmup, NUM_LAYERS)
        expected = {str(l): [float(torch.tensor(a, dtype=torch.float32))] * 2 for l, a in enumerate(table, 1)}
        assert got["alphas"] == expected, (name, case)


def test_schedules_are_mid_warmup():
    """The cases exercise distinct per-layer alphas, exact zeros, and alpha = 1 everywhere."""
    lin = alpha_table("linear", 4, 1.0, NUM_LAYERS)
    assert lin[:4] == [1.0] * 4 and len(set(lin[3:])) == 5 and min(lin) == 0.5
    sw = alpha_table("stagewise-0", 9, 2.0, NUM_LAYERS)
    assert sw == [1.0, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0]
    assert alpha_table("stagewise-0", 16, 2.0, NUM_LAYERS) == [1.0] * NUM_LAYERS


@pytest.mark.parametrize("name", EXACT_CONFIGS)
def test_pipeline_splits_reproduce_world1_exactly(oracle, name):
    ref = _results(oracle)[REFERENCE]["cases"]
    got = _results(oracle)[name]["cases"]
    for case in CASES:
        assert got[case]["loss"] == ref[case]["loss"], (name, case)
        assert got[case]["mb_losses"] == ref[case]["mb_losses"], (name, case)
        assert got[case]["layer_grad_sq"] == ref[case]["layer_grad_sq"], (name, case)
        assert got[case]["layer_param_grad_sq"] == ref[case]["layer_param_grad_sq"], (name, case)
        assert got[case]["other_grad_sq"] == ref[case]["other_grad_sq"], (name, case)


@pytest.mark.parametrize("name", TP_CONFIGS)
def test_tensor_parallel_matches_world1(oracle, name):
    ref = _results(oracle)[REFERENCE]["cases"]
    got = _results(oracle)[name]["cases"]
    worst_abs = worst_rel = 0.0
    for case in CASES:
        pairs = [(got[case]["loss"], ref[case]["loss"])]
        pairs += list(zip(got[case]["mb_losses"], ref[case]["mb_losses"]))
        pairs += [(got[case]["layer_grad_sq"][k], v) for k, v in ref[case]["layer_grad_sq"].items()]
        assert set(got[case]["other_grad_sq"]) == set(ref[case]["other_grad_sq"])
        pairs += [(got[case]["other_grad_sq"][k], v) for k, v in ref[case]["other_grad_sq"].items()]
        for a, b in pairs:
            assert math.isclose(a, b, rel_tol=TP_TOL, abs_tol=TP_TOL), (name, case, a, b)
            d, r = _rel_abs_dev(a, b)
            worst_abs, worst_rel = max(worst_abs, d), max(worst_rel, r if b != 0 else 0.0)
        # TP-replicated parameters (norms) must get the same gradient on every TP rank.
        assert got[case]["tp_replicated_max_abs_diff"] <= TP_TOL, (name, case)
    print(f"\n[oracle] {name}: max |delta| vs world 1 = {worst_abs:.3g} (max rel {worst_rel:.3g}) "
          f"over losses, per-layer and embedding/output/final-norm grad^2")


@pytest.mark.parametrize("name", [c["name"] for c in ALL_CONFIGS])
def test_zero_alpha_layers_get_exactly_zero_gradient(oracle, name):
    case = _results(oracle)[name]["cases"]["stagewise"]
    schedule, warmup, step = CASES["stagewise"]
    for l, a in enumerate(alpha_table(schedule, step, warmup, NUM_LAYERS), 1):
        g = case["layer_grad_sq"][str(l)]
        if a == 0.0:
            assert g == 0.0, (name, l, g)
            assert all(v == 0.0 for v in case["layer_param_grad_sq"][str(l)].values())
        else:
            assert g > 0.0, (name, l)


def test_prores_changes_the_result(oracle):
    """The test can fail if alpha were ignored: mid-warmup != all-alpha=1, at every split."""
    for name, res in _results(oracle).items():
        one = res["cases"]["stagewise_alpha1"]
        for case in ("linear", "stagewise"):
            got = res["cases"][case]
            assert got["loss"] != one["loss"], (name, case)
            for l in range(5, NUM_LAYERS + 1):  # every layer with alpha < 1
                assert got["layer_grad_sq"][str(l)] != one["layer_grad_sq"][str(l)], (name, case, l)
        assert abs(res["cases"]["linear"]["loss"] - one["loss"]) > 1e-4
        assert abs(res["cases"]["stagewise"]["loss"] - one["loss"]) > 1e-4


def test_alpha_one_is_bit_identical_to_vanilla_megatron_spec(oracle):
    """ProRes spec at alpha = 1 == megatron-core's get_gpt_layer_local_spec(normalization='RMSNorm')."""
    ref = _results(oracle)[REFERENCE]["cases"]
    one, vanilla = ref["stagewise_alpha1"], ref["vanilla"]
    assert one["loss"] == vanilla["loss"]
    assert one["mb_losses"] == vanilla["mb_losses"]
    assert one["layer_param_grad_sq"] == vanilla["layer_param_grad_sq"]
    assert one["other_grad_sq"] == vanilla["other_grad_sq"]
    assert vanilla["alphas"] == {}  # the vanilla model has no ProRes modules


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_architectures_across_layouts(oracle, arch):
    """Post-LN, Sandwich-LN, DeepNorm and LNS: PP2 reproduces world 1 exactly, TP2 to 1e-6."""
    import torch

    case = f"arch_{arch}"
    res = _results(oracle)
    ref = res[REFERENCE]["cases"][case]
    pre = res[REFERENCE]["cases"]["linear"]  # same schedule and step, Pre-LN
    assert math.isfinite(ref["loss"]) and ref["loss"] != pre["loss"]
    assert all(g > 0 for g in ref["layer_grad_sq"].values())
    for l, a in enumerate(alpha_table("linear", 4, 1.0, NUM_LAYERS), 1):
        assert ref["alphas"][str(l)] == [float(torch.tensor(a, dtype=torch.float32))] * 2
    pp2 = res["pp2"]["cases"][case]
    assert pp2["loss"] == ref["loss"] and pp2["layer_grad_sq"] == ref["layer_grad_sq"], arch
    assert pp2["layer_param_grad_sq"] == ref["layer_param_grad_sq"], arch
    tp2 = res["tp2"]["cases"][case]
    for a, b in [(tp2["loss"], ref["loss"])] + [(tp2["layer_grad_sq"][k], v) for k, v in ref["layer_grad_sq"].items()]:
        assert math.isclose(a, b, rel_tol=TP_TOL, abs_tol=TP_TOL), (arch, a, b)
    assert tp2["tp_replicated_max_abs_diff"] <= TP_TOL
    print(f"\n[oracle] {arch}: loss ws1 {ref['loss']!r}, pp2 {pp2['loss']!r}, tp2 {tp2['loss']!r}")


def test_monitor_matches_direct_computation_across_layouts(oracle):
    """prores_megatron.monitoring.layer_stats: per-layer branch/output statistics and grad norms equal a direct
    computation (forward hooks, p.grad) at world size 1, and TP2 / PP2 reproduce them."""
    res = _results(oracle)
    ref = res[REFERENCE]["cases"]["monitor"]
    assert len(ref["table"]) == NUM_LAYERS
    for got, direct in zip(ref["table"], ref["direct_table"]):
        for a, b in zip(got, direct):
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12), (got, direct)  # fp32 sums
    for a, b in zip(ref["grad_sq"], ref["direct_grad_sq"]):
        assert math.isclose(a, b, rel_tol=1e-6), (a, b)
    # Same grads as the plain linear case of the oracle (same model, step and batches).
    lin = res[REFERENCE]["cases"]["linear"]["layer_grad_sq"]
    for l in range(1, NUM_LAYERS + 1):
        assert math.isclose(ref["grad_sq"][l - 1], lin[str(l)], rel_tol=1e-6)
    for name, tol in (("pp2", 0.0), ("tp2", 1e-6)):
        got = res[name]["cases"]["monitor"]
        for row_g, row_r in zip(got["table"], ref["table"]):
            for a, b in zip(row_g, row_r):
                assert math.isclose(a, b, rel_tol=tol, abs_tol=tol), (name, row_g, row_r)
        for a, b in zip(got["grad_sq"], ref["grad_sq"]):
            assert math.isclose(a, b, rel_tol=tol, abs_tol=tol), (name, a, b)
    # Columns 8, 9: alpha read from each layer's residual buffer, once per rank holding the layer.
    # The monitor case is linear, T = 1, t = 4: alpha(l) = min(4 / l, 1), stored in fp32.
    for name in (REFERENCE, "pp2", "tp2"):
        for l, row in enumerate(res[name]["cases"]["monitor"]["table"], start=1):
            assert row[8] / row[9] == struct.unpack("f", struct.pack("f", min(4 / l, 1.0)))[0], (name, l)
    rms = [math.sqrt(r[4] / r[5]) for r in ref["table"]]
    print("\n[oracle] monitor: layer-output RMS by depth", " ".join(f"{v:.4g}" for v in rms))
