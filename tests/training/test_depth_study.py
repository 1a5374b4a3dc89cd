"""examples/scripts/depth_study_gpu.sh: the paper's depth study as a GPU recipe, checked on CPU.

Every configuration the script would launch (24, 48, 72, 96 and 120 layers, ProRes and baseline)
goes through the project's dry run (Megatron-LM's own argument validation, ProRes's, the
TransformerConfig, the layer table), in this process from the command the script hands to its
interpreter (a recording stub); the 120-layer ProRes one also runs end to end, script -> dry run,
in a subprocess. Independent expectations, from docs/method.md §7 (the paper's recipe) by hand:
T = 1000 steps per layer up to 72 layers and 500 beyond, so all layers are on at 24k, 48k, 72k,
48k and 60k of 100k steps; WSD with 2000 warmup steps and the last 10 % decaying; parameters
L (4h² + 3hF + 2h) + 2Vh + h with h = 512, F = 1368, V = 32000 (108,388,864 at 24 layers);
--budget 0.1 gives 10,000 steps, T = 100 / 50, 200 warmup and 1000 decay steps, and 120 layers
all on at 6,000 = 60 % of the run, the paper's 60k of 100k.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from stubs import recording_stub

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "scripts" / "depth_study_gpu.sh"
DEPTHS = (24, 48, 72, 96, 120)
ALL_ON = {24: 24_000, 48: 48_000, 72: 72_000, 96: 48_000, 120: 60_000}  # T·L, the paper's T
h, F, V = 512, 1368, 32000


def script(tmp: Path, *args, **env):
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NODE_RANK", "GPUS_PER_NODE", "RUN_DIR", "DRY_RUN",
                                 "BUDGET", "DEPTHS", "VARIANTS"))}
    base.update(PYTHON=str(recording_stub(tmp / "stub" / "python")), MOCK="1", OMP_NUM_THREADS="1")
    base.update(env)
    return subprocess.run(["bash", str(SCRIPT), *args], env=base, capture_output=True, text=True, timeout=120)


def recorded(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def flag(argv, name):
    """The value Megatron-LM's parser takes: the last occurrence wins."""
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """{(L, variant): (argv, report)}: each configuration of `--dry-run` through the dry run."""
    from prores_megatron.training import dry_run as dr

    tmp = tmp_path_factory.mktemp("depth_study")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NNODES", "RUN_DIR"))}
    full = subprocess.Popen(["bash", str(SCRIPT), "--dry-run", "--depths", "120", "--variants", "prores"],
                            env=dict(env, PYTHON=sys.executable, MOCK="1", OMP_NUM_THREADS="1", DRY_RUN_ARGS="--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    calls = recorded(script(tmp, "--dry-run"))
    out = {}
    for call, (L, variant) in zip(calls, [(L, v) for L in DEPTHS for v in ("prores", "baseline")], strict=True):
        argv = call["argv"]
        assert argv[:2] == ["-m", "prores_megatron.training.dry_run"]
        with mock.patch.dict(os.environ, {"CUDA_DEVICE_MAX_CONNECTIONS": call["cuda_device_max_connections"] or ""}):
            try:
                report = json.loads(json.dumps(dr.run(argv[2:])))
            except dr.DryRunError as err:
                report = dict(ok=False, error=str(err))
        out[(L, variant)] = (argv[2:], report)
    stdout, stderr = full.communicate(timeout=300)
    out["subprocess"] = dict(rc=full.returncode, stdout=stdout, stderr=stderr)
    return out


@pytest.mark.parametrize("variant", ["prores", "baseline"])
@pytest.mark.parametrize("L", DEPTHS)
def test_every_configuration_passes_the_dry_run(dry_runs, L, variant):
    argv, report = dry_runs[(L, variant)]
    assert report["ok"], report.get("error")
    assert report["num_layers"] == L and report["launch"]["world_size"] == 8  # 1 node x 8 GPUs by default
    assert sorted(l for c in report["chunks"] for l in c["layers"]) == list(range(1, L + 1))
    assert report["params"]["total"] == L * (4 * h * h + 3 * h * F + 2 * h) + 2 * V * h + h
    p = report["parallel"]
    assert (p["tensor"], p["pipeline"], p["data"], p["global_batch_size"]) == (1, 1, 8, 512)
    for name, value in (("--hidden-size", "512"), ("--ffn-hidden-size", "1368"), ("--num-attention-heads", "8"),
                        ("--seq-length", "1024"), ("--lr", "2e-3"), ("--min-lr", "0"), ("--train-iters", "100000"),
                        ("--lr-decay-style", "WSD"), ("--lr-wsd-decay-style", "linear"),
                        ("--lr-warmup-iters", "2000"), ("--lr-wsd-decay-iters", "10000"), ("--eval-iters", "20"),
                        ("--normalization", "RMSNorm"), ("--position-embedding-type", "rope"),
                        ("--prores-init", "plain"), ("--seed", "1234"), ("--eval-interval", "5000"),
                        ("--save-interval", "10000")):
        assert flag(argv, name) == value, name
    for name in ("--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--bf16"):
        assert name in argv, name
    assert not any(a.startswith("--fp8") for a in argv)
    assert flag(argv, "--save") == flag(argv, "--load") == f"/path/to/RUN_DIR/L{L}_{variant}/checkpoints"
    assert flag(argv, "--tensorboard-dir") == f"/path/to/RUN_DIR/L{L}_{variant}/tensorboard"
    assert int(flag(argv, "--prores-monitor-interval")) > 0  # its JSONL (in --save) feeds the analysis
    if variant == "prores":
        assert flag(argv, "--prores-schedule") == "linear"
        assert report["alpha_plan"]["full_step"][-1] == ALL_ON[L] and not report["warnings"]
    else:
        assert flag(argv, "--prores-schedule") == "none" and "--prores-warmup-steps" not in argv


@pytest.mark.parametrize("L", DEPTHS)
def test_prores_and_baseline_differ_only_in_prores_and_paths(dry_runs, L):
    prores, baseline = dry_runs[(L, "prores")][0], dry_runs[(L, "baseline")][0]
    strip = lambda argv, variant: [a.replace(f"L{L}_{variant}", "RUN") for a in argv[:argv.index("--prores-schedule")]]
    assert strip(prores, "prores") == strip(baseline, "baseline")
    assert prores[prores.index("--prores-schedule"):] == ["--prores-schedule", "linear", "--prores-warmup-steps",
                                                          "1000" if L <= 72 else "500"]
    assert baseline[baseline.index("--prores-schedule"):] == ["--prores-schedule", "none"]


def test_the_script_dry_run_end_to_end(dry_runs):
    """`bash depth_study_gpu.sh --dry-run` itself, with the real interpreter: the report on stdout, exit 0."""
    run = dry_runs["subprocess"]
    assert run["rc"] == 0, run["stderr"][-3000:]
    report = json.loads(run["stdout"])
    assert report["ok"] and report["num_layers"] == 120 and report["alpha_plan"]["full_step"][-1] == 60_000
    assert report["argv"][:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "dry run: all 1 configurations pass (100000 steps, budget 1)" in run["stderr"]


@pytest.mark.parametrize("budget, steps, warmup, decay, T_short, T_deep", [
    ("0.1", 10_000, 200, 1_000, "100", "50"),
    ("0.0123", 1_230, 25, 123, "12.3", "6.15"),  # 2 % of 1230 = 24.6 -> 25 warmup steps
    ("1", 100_000, 2_000, 10_000, "1000", "500"),
])
def test_budget_scales_steps_and_T_together(tmp_path, budget, steps, warmup, decay, T_short, T_deep):
    calls = recorded(script(tmp_path, "--dry-run", "--budget", budget, "--depths", "72,120", "--variants", "prores"))
    assert len(calls) == 2
    for call, T in zip(calls, (T_short, T_deep)):
        argv = call["argv"]
        assert flag(argv, "--train-iters") == str(steps) and flag(argv, "--lr-warmup-iters") == str(warmup)
        assert flag(argv, "--lr-wsd-decay-iters") == str(decay) and flag(argv, "--prores-warmup-steps") == T


def test_budget_keeps_T_L_share_of_the_run(tmp_path):
    """Budget 0.1 at 120 layers: every layer on at step 6,000 of 10,000, the paper's 60k of 100k."""
    from prores_megatron.training import dry_run as dr

    argv = recorded(script(tmp_path, "--dry-run", "--budget", "0.1", "--depths", "120", "--variants", "prores"))[0]
    report = dr.run(argv["argv"][2:])
    assert report["alpha_plan"]["full_step"][-1] == 6_000 and not report["warnings"]


@pytest.mark.parametrize("args, needle", [
    (["--budget", "0"], "--budget 0 is outside 0 < F <= 1"),
    (["--budget", "1.5"], "--budget 1.5 is outside 0 < F <= 1"),
    (["--budget", "-0.1"], "--budget '-0.1' is not a number"),
    (["--budget", "ten"], "--budget 'ten' is not a number"),
    (["--budget", "0.0001"], "--budget 0.0001 gives 10 steps, too few for one LR-warmup step"),
    (["--budget"], "--budget needs a value"),
    (["--depths", "24,x"], "--depths '24,x'"),
    (["--variants", "both"], "--variants 'both'"),
    (["--steps", "5"], "unknown argument '--steps'"),
], ids=["zero", "above_one", "negative", "word", "too_small", "missing", "depths", "variants", "unknown"])
def test_bad_options_are_refused_by_name_before_anything_runs(tmp_path, args, needle):
    proc = script(tmp_path, "--dry-run", *args)
    assert proc.returncode == 2 and needle in proc.stderr and proc.stdout == "", proc.stderr


def test_launch_runs_each_configuration_and_skips_finished_ones(tmp_path):
    """Not a dry run, with the stub as interpreter: one torchrun per configuration, in its own
    directories; a run whose checkpoint tracker says the last step is skipped."""
    run_dir = tmp_path / "study"
    done = run_dir / "L24_prores" / "checkpoints"
    done.mkdir(parents=True)
    (done / "latest_checkpointed_iteration.txt").write_text("1000")  # budget 0.01: 1000 steps
    calls = recorded(script(tmp_path, "--budget", "0.01", "--depths", "24,48", RUN_DIR=str(run_dir)))
    assert [flag(c["argv"], "--save") for c in calls] == [str(run_dir / f"L{L}_{v}" / "checkpoints") for L, v in
                                                         (("24", "baseline"), ("48", "prores"), ("48", "baseline"))]
    for c in calls:
        assert c["argv"][:2] == ["-m", "torch.distributed.run"] and c["cuda_device_max_connections"] == "1"
        assert flag(c["argv"], "--data-cache-path") == str(run_dir / "data_cache")  # one index cache for all


def test_analyze_runs_the_depth_command_on_the_study(tmp_path):
    call = recorded(script(tmp_path, "--analyze", RUN_DIR=str(tmp_path / "study")))[0]
    assert call["argv"] == ["-m", "prores_megatron.analysis.cli", "depth", "--study-dir", str(tmp_path / "study"),
                            "--out", str(tmp_path / "study" / "analysis")]


def test_a_refused_configuration_fails_the_dry_run_by_name(tmp_path):
    """The dry run goes through every configuration and names the refused ones (here an interpreter
    that refuses 48 layers, as the dry run refuses a configuration: exit status 2)."""
    refusing = tmp_path / "refusing" / "python"
    refusing.parent.mkdir()
    refusing.write_text('#!/bin/sh\ncase " $* " in *" --num-layers 48 "*) exit 2 ;; esac\necho ok\n')
    refusing.chmod(0o755)
    proc = script(tmp_path, "--dry-run", PYTHON=str(refusing))
    assert proc.returncode == 2 and proc.stdout.split() == ["ok"] * 8
    assert "dry run: 2 of 10 configurations refused: L48_prores L48_baseline" in proc.stderr
