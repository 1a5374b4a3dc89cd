"""Launch scripts, their GPU-free dry run, and the Megatron-LM patch.

Independent expectations: Llama-2-7B has 6,738,415,616 parameters (its published Hugging Face
count); the layer -> (pipeline rank, virtual chunk) tables of docs/megatron.md §2 were measured on
built models; the 120-layer script's layout is the per-rank split its README documents; parameter
counts of small shapes are compared with megatron-core models actually built on CPU.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from stubs import recording_stub

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "examples" / "scripts"
PATCH = ROOT / "patches" / "megatron-lm-core_r0.19.0-pretrain_gpt-prores.patch"

# script -> (extra environment, world size it is meant for, L)
NODE = dict(MOCK="1", MASTER_ADDR="node001")  # 8 nodes need a real rendezvous address
LAUNCHES = {
    "llama2_7b": ("pretrain_llama2_7b_prores.sh", NODE, 64, 32),
    "120l": ("pretrain_120l_prores.sh", NODE, 64, 120),
    "tiny_cpu": ("pretrain_tiny_cpu.sh", dict(MASTER_PORT="29999"), 2, 8),
    # deliberately broken through the script's own knobs: 120 layers over 7 stages, no layout
    "120l_pp7": ("pretrain_120l_prores.sh", dict(NODE, PP="7", PP_LAYOUT=""), 64, 120),
    "llama2_7b_delayed": ("pretrain_llama2_7b_prores.sh", dict(NODE, FP8_RECIPE="delayed"), 64, 32),
    # every optional group switched on: Megatron-LM's validation must accept each flag
    "120l_options": ("pretrain_120l_prores.sh", dict(NODE, ASYNC_SAVE="1", NON_PERSISTENT_SAVE_INTERVAL="100",
                                                     PROFILE="1", WANDB_PROJECT="prores", RECOMPUTE="full",
                                                     EXIT_DURATION_MINS="230", FP8_RECIPE="delayed"), 64, 120),
}


def script_env(tmp: Path, extra: dict) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, DRY_RUN="1", DRY_RUN_ARGS="--json",
               OMP_NUM_THREADS="1", CHECKPOINT_PATH=str(tmp / "ckpt"),
               TENSORBOARD_LOGS_PATH=str(tmp / "tb"), SAVE_DIR=str(tmp / "ckpt"))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """Each script's dry run. The script runs with a recording stub as PYTHON (what it would execute),
    and that command's dry run runs here, in-process; the 120-layer one also runs for real, end to
    end, in a subprocess alongside (one Python start instead of four)."""
    from prores_megatron.training import dry_run as dr

    tmp = tmp_path_factory.mktemp("dry_runs")
    full = subprocess.Popen(["bash", str(SCRIPTS / LAUNCHES["120l"][0])],
                            env=script_env(tmp, LAUNCHES["120l"][1]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stub = recording_stub(tmp / "stub" / "python")
    out = {}
    for name, (script, extra, _, _) in LAUNCHES.items():
        proc = subprocess.run(["bash", str(SCRIPTS / script)],
                              env=script_env(tmp, {**extra, "PYTHON": str(stub)}),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        recorded = json.loads(proc.stdout)
        assert recorded["argv"][:3] == ["-m", "prores_megatron.training.dry_run", "--dry-run-nnodes"]
        env = {"CUDA_DEVICE_MAX_CONNECTIONS": recorded["cuda_device_max_connections"] or ""}
        with mock.patch.dict(os.environ, env):
            try:
                out[name] = dict(report=json.loads(json.dumps(dr.run(recorded["argv"][2:]))), error=None)
            except dr.DryRunError as err:
                out[name] = dict(report=None, error=str(err))
        out[name]["argv"] = recorded["argv"][2:]
    stdout, stderr = full.communicate(timeout=300)
    out["120l"]["subprocess"] = dict(rc=full.returncode, stdout=stdout, stderr=stderr)
    return out


def covered_layers(report):
    return sorted(layer for chunk in report["chunks"] for layer in chunk["layers"])


@pytest.mark.parametrize("name", ["llama2_7b", "120l", "tiny_cpu"])
def test_script_dry_run_passes_for_its_world_size(dry_runs, name):
    _, _, world, L = LAUNCHES[name]
    report = dry_runs[name]["report"]
    assert report is not None, dry_runs[name]["error"]
    assert report["ok"] and report["launch"]["world_size"] == world
    argv = report["argv"]
    assert int(argv[argv.index("--num-layers") + 1]) == L == report["num_layers"]
    assert covered_layers(report) == list(range(1, L + 1))  # each of 1..L exactly once
    assert argv[argv.index("-m", argv.index("--master_port")) + 1] == "prores_megatron.training.pretrain_gpt"
    p = report["parallel"]
    assert p["tensor"] * p["pipeline"] * p["context"] * p["data"] == world


def test_120_layer_dry_run_end_to_end(dry_runs):
    """`DRY_RUN=1 bash pretrain_120l_prores.sh` itself: the same report, on stdout, exit 0."""
    run = dry_runs["120l"]["subprocess"]
    assert run["rc"] == 0, run["stderr"][-3000:]
    def same_but_interpreter(report):  # the in-process run had a recording stub as PYTHON
        report = dict(report, argv=report["argv"][1:])
        for key in ("launcher", "command"):
            report.pop(key)
        return report

    report = json.loads(run["stdout"])
    assert same_but_interpreter(report) == same_but_interpreter(dry_runs["120l"]["report"])
    assert report["argv"][:3] == [sys.executable, "-m", "torch.distributed.run"]


def test_llama2_7b_dry_run(dry_runs):
    report = dry_runs["llama2_7b"]["report"]
    assert report["params"]["total"] == 6_738_415_616  # Llama-2-7B, untied, vocabulary 32000
    p = report["parallel"]
    assert (p["tensor"], p["pipeline"], p["data"], p["sequence_parallel"]) == (1, 1, 64, False)
    argv = report["argv"]
    # NVIDIA's H100 FP8 recipe flags (Megatron-LM examples/llama/train_llama3_8b_h100_fp8.sh), all
    # accepted by Megatron-LM's own validation (the dry run ran it).
    for flag in ("--fp8-format", "--fp8-param-gather", "--use-distributed-optimizer", "--overlap-grad-reduce",
                 "--overlap-param-gather", "--grad-reduce-in-bf16", "--cross-entropy-loss-fusion", "--manual-gc",
                 "--exit-signal-handler", "--data-cache-path", "--num-workers",
                 "--no-create-attention-mask-in-dataloader", "--tensorboard-dir", "--log-timers-to-tensorboard",
                 "--log-memory-to-tensorboard", "--bf16"):
        assert flag in argv, flag
    assert "--recompute-granularity" not in argv and "--tp-comm-overlap" not in argv  # TP 1
    assert argv[argv.index("--prores-monitor-interval") + 1] == "100"
    # 57 GiB per GPU at TP 1 (Megatron-LM's estimate): an 80 GB H100 holds it, so no TP is needed.
    assert 50 * 1024 < report["memory_estimate"]["total_mb"] < 64 * 1024
    assert argv[argv.index("--transformer-impl") + 1] == "transformer_engine"
    assert argv[argv.index("--ckpt-format") + 1] == "torch_dist"
    plan = report["alpha_plan"]
    assert plan["full_step"] == [1000.0 * l for l in range(1, 33)] and not report["warnings"]


@pytest.mark.parametrize("name, recipe, history", [("llama2_7b", "tensorwise", False), ("120l", "tensorwise", False),
                                                   ("llama2_7b_delayed", "delayed", True)])
def test_fp8_recipe_is_a_script_variable(dry_runs, name, recipe, history):
    """FP8_RECIPE picks the scaling (current scaling unless asked; docs/benchmarks.md §3 says why);
    the amax-history flags belong to delayed scaling only. Megatron-LM's validation accepts each."""
    argv = dry_runs[name]["argv"]
    assert dry_runs[name]["error"] is None
    assert argv[argv.index("--fp8-recipe") + 1] == recipe and argv[argv.index("--fp8-format") + 1] == "hybrid"
    assert ("--fp8-amax-history-len" in argv) == history
    # Transformer Engine >= 2.20 refuses delayed scaling's pickled extra state on resume unless
    # NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1: the dry run warns, naming it, for delayed only.
    warned = [w for w in dry_runs[name]["report"]["warnings"] if "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1" in w]
    assert bool(warned) == (recipe == "delayed"), dry_runs[name]["report"]["warnings"]


def test_figures_in_the_scripts_readme_are_the_dry_runs(dry_runs):
    """examples/scripts/README.md quotes the dry runs' memory estimates and warmup tokens; each figure
    is the one the dry run prints (rounded as it prints them: GiB to 0.1, tokens to 3 digits)."""
    import re

    readme = (SCRIPTS / "README.md").read_text()
    from prores_megatron.training.dry_run import format_report

    for name in ("llama2_7b", "120l"):
        report = dry_runs[name]["report"]
        m = report["memory_estimate"]
        printed = format_report(report)
        weights, acts, total = (f"{m[k] / 1024:.1f}" for k in ("weight_and_optimizer_mb", "activation_mb", "total_mb"))
        assert f"weights and optimizer {weights} GiB + activations {acts} GiB = {total} GiB" in printed
        quoted = re.search(rf"<!-- dry run {name} -->(.*?)<!-- /dry run -->", readme, re.S)
        assert quoted, f"examples/scripts/README.md: no figures marked for {name}"
        text = " ".join(quoted.group(1).split())
        assert f"{weights} GiB of weights and optimizer state + {acts} GiB of activations = {total} GiB" in text, text
        tokens = report["alpha_plan"]["tokens_per_layer"]
        assert f"{tokens / 1e9:.3g} B tokens per layer" in text, text
    # The quoted figures, by hand from the flags: 7B T = 1000 x 1024 x 4096; 120 layers T = 500 x 512 x 4096.
    assert dry_runs["llama2_7b"]["report"]["alpha_plan"]["tokens_per_layer"] == 1000 * 1024 * 4096
    assert dry_runs["120l"]["report"]["alpha_plan"]["tokens_per_layer"] == 500 * 512 * 4096


def test_optional_groups_pass_megatron_validation(dry_runs):
    run = dry_runs["120l_options"]
    assert run["error"] is None, run["error"]
    argv = run["report"]["argv"]
    for flag in ("--async-save", "--non-persistent-save-interval", "--non-persistent-ckpt-type", "--profile",
                 "--profile-step-start", "--wandb-project", "--recompute-granularity", "--exit-duration-in-mins"):
        assert flag in argv, flag
    assert argv[:3] == ["nsys", "profile", "-s"]  # PROFILE=1: Nsight Systems around the launcher
    assert "--capture-range=cudaProfilerApi" in argv
    assert run["report"]["launcher"]["per_node"].startswith("nsys profile")


@pytest.mark.parametrize("recipe, ok", [("none", True), ("mxfp9", False)])
def test_fp8_recipe_none_is_bf16_and_unknown_is_refused(tmp_path, recipe, ok):
    stub = recording_stub(tmp_path / "stub" / "python")
    proc = subprocess.run(["bash", str(SCRIPTS / "pretrain_llama2_7b_prores.sh")],
                          env=script_env(tmp_path, dict(NODE, FP8_RECIPE=recipe, PYTHON=str(stub))),
                          capture_output=True, text=True, timeout=60)
    if ok:
        argv = json.loads(proc.stdout)["argv"]
        assert "--bf16" in argv and not any(a.startswith("--fp8") for a in argv)
    else:
        assert proc.returncode == 2 and "FP8_RECIPE=mxfp9" in proc.stderr and proc.stdout == ""


def test_120_layer_dry_run_uses_the_documented_balanced_layout(dry_runs):
    report = dry_runs["120l"]["report"]
    p = report["parallel"]
    assert (p["tensor"], p["pipeline"], p["virtual_pipeline"], p["data"]) == (2, 8, 3, 4)
    per_rank = [sum(len(c["layers"]) for c in report["chunks"] if c["pp_rank"] == r) for r in range(8)]
    assert per_rank == [14, 15, 15, 16, 16, 15, 15, 14]
    first = next(c for c in report["chunks"] if c["embedding"])
    last = next(c for c in report["chunks"] if c["loss"])
    assert (first["pp_rank"], first["vp_stage"], first["layers"]) == (0, 0, [1, 2, 3, 4])
    assert (last["pp_rank"], last["vp_stage"], last["layers"]) == (7, 2, [117, 118, 119, 120])
    # Interleaving: virtual stage v of rank r follows stage v of rank r-1 in layer order.
    chunk = {(c["pp_rank"], c["vp_stage"]): c["layers"] for c in report["chunks"]}
    order = [chunk[(r, v)] for v in range(3) for r in range(8)]
    assert [l for layers in order for l in layers] == list(range(1, 121))
    h, F, V = 2048, 5632, 32000
    assert report["params"]["total"] == 120 * (4 * h * h + 3 * h * F + 2 * h) + 2 * V * h + h
    assert 6.0e9 < report["params"]["total"] < 6.5e9
    assert report["alpha_plan"]["full_step"][-1] == 500.0 * 120 and not report["warnings"]
    assert 0 < report["memory_estimate"]["total_mb"] < 80 * 1024  # Megatron-LM's own estimator
    argv = report["argv"]
    for flag in ("--sequence-parallel", "--tp-comm-overlap", "--fp8-param-gather", "--grad-reduce-in-bf16",
                 "--exit-signal-handler", "--prores-monitor-interval"):  # TP 2: SP and TP overlap
        assert flag in argv, flag


def test_tiny_cpu_dry_run_matches_its_launch_line(dry_runs):
    report = dry_runs["tiny_cpu"]["report"]
    argv = report["argv"]
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    assert argv[argv.index("--nproc_per_node") + 1] == "2" and "--transformer-impl" in argv
    # T = 2 steps per layer is a smoke-test setting: the dry run says it is too short to matter.
    assert any("very short" in w for w in report["warnings"])


def test_broken_script_configuration_is_refused(dry_runs, capsys):
    from prores_megatron.training.dry_run import main

    error = dry_runs["120l_pp7"]["error"]
    assert "--num-layers 120" in error and "--pipeline-model-parallel-size 7" in error
    # The command-line path: exit status 2, the reason on stderr, {"ok": false, ...} for --json.
    assert main([*dry_runs["120l_pp7"]["argv"]]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"ok": False, "error": error}
    assert f"prores_megatron.training.dry_run: error: {error}" in captured.err


def test_script_runs_exactly_the_dry_run_command(dry_runs, tmp_path):
    """The 120-layer script, not in dry-run mode, with a recording stub as PYTHON: it launches
    ``$PYTHON -m torch.distributed.run`` with exactly the dry run's command (same interpreter)."""
    stub = recording_stub(tmp_path / "bin" / "python")
    expected = dry_runs["120l"]["report"]["argv"]
    env = script_env(tmp_path, dict(NODE, DRY_RUN="0", PYTHON=str(stub),
                                    CHECKPOINT_PATH=expected[expected.index("--save") + 1],
                                    TENSORBOARD_LOGS_PATH=expected[expected.index("--tensorboard-dir") + 1]))
    proc = subprocess.run(["bash", str(SCRIPTS / "pretrain_120l_prores.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    recorded = json.loads(proc.stdout)
    assert Path(expected[0]).name == "python" and recorded["argv"] == expected[1:]
    assert expected[1:3] == ["-m", "torch.distributed.run"]
    assert recorded["cuda_device_max_connections"] == "1"


# ---- the dry run in-process: refusals and docs/megatron.md §2's layer tables ----------------------

TINY = (
    "--hidden-size 64 --num-attention-heads 4 --seq-length 64 --max-position-embeddings 64 "
    "--micro-batch-size 1 --global-batch-size 8 --train-iters 100 --eval-interval 100 --lr 1e-3 "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 128 --transformer-impl local "
    "--no-rope-fusion --distributed-backend gloo --prores-schedule linear --prores-warmup-steps 10"
).split()


def dry_run(extra: str, world: int = 2):
    from prores_megatron.training import dry_run as dr

    return dr.run([f"--dry-run-world-size={world}", *TINY, *extra.split()])


def refused(extra: str, world: int = 2) -> str:
    from prores_megatron.training.dry_run import DryRunError

    with pytest.raises(DryRunError) as err:
        dry_run(extra, world)
    return str(err.value)


def chunk_table(report):
    """{pp_rank: [layers of chunk 0, layers of chunk 1, ...]}"""
    table = {}
    for c in report["chunks"]:
        table.setdefault(c["pp_rank"], []).append(c["layers"])
    return table


@pytest.mark.parametrize(
    "flags, world, expected",
    [
        ("--num-layers 8 --pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2",
         2, {0: [[1, 2], [5, 6]], 1: [[3, 4], [7, 8]]}),
        ("--num-layers 5 --pipeline-model-parallel-size 2 --decoder-first-pipeline-num-layers 2",
         2, {0: [[1, 2]], 1: [[3, 4, 5]]}),
        ("--num-layers 5 --pipeline-model-parallel-size 2 --decoder-last-pipeline-num-layers 2",
         2, {0: [[1, 2, 3]], 1: [[4, 5]]}),
        ("--num-layers 7 --pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 "
         "--account-for-embedding-in-pipeline-split", 2, {0: [[1], [4, 5]], 1: [[2, 3], [6, 7]]}),
        ("--num-layers 12 --pipeline-model-parallel-size 4 --num-virtual-stages-per-pipeline-rank 2 "
         "--decoder-first-pipeline-num-layers 2 --decoder-last-pipeline-num-layers 2", 4,
         {0: [[1], [7]], 1: [[2, 3], [8, 9]], 2: [[4, 5], [10, 11]], 3: [[6], [12]]}),
        ("--num-layers 6 --pipeline-model-parallel-size 2 --pipeline-model-parallel-layout Et|t|tt|ttL",
         2, {0: [[1], [3, 4]], 1: [[2], [5, 6]]}),
    ],
    ids=["pp2vp2", "first2", "last2", "account_embedding", "pp4vp2_uneven", "layout"],
)
def test_layer_table_matches_the_documented_tables(flags, world, expected):
    assert chunk_table(dry_run(flags, world)) == expected


def test_uneven_first_last_with_virtual_stages_at_pp2_is_refused():
    # docs/megatron.md §2: mcore raises ZeroDivisionError in get_transformer_layer_offset here.
    msg = refused("--num-layers 6 --pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 "
                  "--decoder-first-pipeline-num-layers 2 --decoder-last-pipeline-num-layers 4")
    assert "ZeroDivisionError" in msg and "--pipeline-model-parallel-layout" in msg


@pytest.mark.parametrize(
    "flags, world, needles",
    [
        ("--num-layers 30 --pipeline-model-parallel-size 4", 4,
         ["--num-layers 30", "--pipeline-model-parallel-size 4", "[1, 2, 3, 5, 6, 10, 15, 30]"]),
        ("--num-layers 6 --pipeline-model-parallel-size 2 --pipeline-model-parallel-layout Et|t|t|ttL", 2,
         ["places 5 decoder layers", "--num-layers is 6"]),
        ("--num-layers 8 --pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 "
         "--no-overlap-p2p-communication", 2, ["--no-overlap-p2p-communication", "PP > 2"]),
        ("--num-layers 6 --pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2 "
         "--pipeline-model-parallel-layout Et|t|tt|ttL", 2, ["mutually exclusive"]),
        ("--num-layers 6 --pipeline-model-parallel-size 2 --decoder-first-pipeline-num-layers 2 "
         "--decoder-last-pipeline-num-layers 2", 2, ["add up to 4", "--num-layers 6"]),
        ("--num-layers 8 --decoder-last-pipeline-num-layers 3", 1,
         ["need --pipeline-model-parallel-size > 1"]),
        ("--num-layers 8 --pipeline-model-parallel-size 2", 3, ["world size 3", "= 2"]),
        ("--num-layers 8 --prores-warmup-steps 0", 1, ["--prores-warmup-steps=0"]),
        ("--num-layers 8 --overlap-param-gather", 1,
         ["Megatron-LM's validate_args", "--overlap-param-gather"]),
    ],
    ids=["not_divisible", "layout_sum", "pp2_batched_p2p", "two_vpp_flags", "uneven_sum",
         "uneven_pp1", "world_size", "prores_flag", "megatron_refusal"],
)
def test_broken_configurations_are_refused_naming_the_flags(flags, world, needles):
    msg = refused(flags, world)
    for needle in needles:
        assert needle in msg, msg


def test_coverage_check_names_missing_and_repeated_layers():
    from prores_megatron.training.pipeline_layout import Chunk, PipelineLayoutError, check_layer_coverage

    # What Megatron-LM issue #1304 built (30 layers at PP=4: 28, silently), plus a repeated layer.
    table = [Chunk(r, 0, tuple(range(7 * r + 1, 7 * r + 8)), r == 0, r == 3) for r in range(4)]
    table.append(Chunk(3, 1, (28,), False, False))
    with pytest.raises(PipelineLayoutError) as err:
        check_layer_coverage(table, 30)
    assert "never built: 29-30" in str(err.value) and "28 on (pp, vp) [(3, 0), (3, 1)]" in str(err.value)


def test_dry_run_world_size_flags_must_agree():
    msg = refused("--num-layers 8 --dry-run-nnodes 2 --dry-run-nproc-per-node 4", world=4)
    assert "--dry-run-world-size 4 != --dry-run-nnodes 2 x --dry-run-nproc-per-node 4" in msg


def test_alpha_plan_warns_when_warmup_outlasts_the_run():
    report = dry_run("--num-layers 8 --prores-warmup-steps 20", world=1)  # ends at 160 > 100 iters
    plan = report["alpha_plan"]
    assert plan["full_step"] == [20.0 * l for l in range(1, 9)] and plan["all_on_step"] == 160
    # t = 0..99 run; layer 5 would first be fully on at t = 100.
    assert any("4 of 8 layers never reach alpha = 1 (layers 5..8" in w for w in report["warnings"])


def test_sample_counted_plan_and_tokens_per_layer():
    """--prores-warmup-samples: the plan counts samples and is checked against --train-samples; the
    warmup per layer in tokens, by hand: S x seq = 100 x 64 = 6400 (steps: T x batch x seq)."""
    from prores_megatron.training import dry_run as dr
    from prores_megatron.training.dry_run import format_report

    def without(*pairs):
        argv = list(TINY)
        for flag in pairs:
            i = argv.index(flag)
            del argv[i:i + 2]
        return argv

    argv = without("--train-iters", "--prores-warmup-steps")
    report = dr.run(["--dry-run-world-size=1", *argv, "--num-layers", "8", "--train-samples", "640",
                     "--prores-warmup-samples", "100"])
    plan = report["alpha_plan"]
    assert plan["unit"] == "samples" and plan["full_step"] == [100.0 * l for l in range(1, 9)]
    assert plan["tokens_per_layer"] == 100 * 64
    # 800 samples to warm all 8 layers > 640: layers 7, 8 (700, 800) never reach alpha = 1.
    assert any("warmup ends at 800 samples but --train-samples is 640: 2 of 8 layers never reach alpha = 1"
               in w for w in report["warnings"]), report["warnings"]
    text = format_report(report)
    assert "S = 100 samples per layer" in text and "every layer at alpha = 1 from consumed samples 800" in text
    assert "warmup per layer: 6.4e-06 B tokens = 1.22e-05 x the paper's reference" in text  # 6400 / 524288000
    steps = dry_run("--num-layers 8", world=1)["alpha_plan"]
    assert steps["tokens_per_layer"] == 10 * 8 * 64  # T x global batch x seq
    off = dr.run(["--dry-run-world-size=1", *without("--prores-schedule", "--prores-warmup-steps"), "--num-layers", "8"])
    assert "ProRes off (no --prores-schedule): the stock Megatron-LM model" in off["notes"]


# ---- parameter count against models megatron-core actually builds --------------------------------

@pytest.mark.parametrize(
    "shape",
    [
        dict(normalization="RMSNorm", gated_linear_unit=True, num_query_groups=2, add_bias_linear=False,
             tied=False, qk_layernorm=False, position="rope"),
        dict(normalization="LayerNorm", gated_linear_unit=False, num_query_groups=4, add_bias_linear=True,
             tied=True, qk_layernorm=True, position="learned_absolute"),
    ],
    ids=["llama_gqa_swiglu_untied", "gpt_bias_tied_qknorm"],
)
def test_parameter_count_matches_a_built_model(mcore_world1, shape):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from prores_megatron.training.param_count import count_parameters

    config = TransformerConfig(
        num_layers=3, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
        num_query_groups=shape["num_query_groups"], normalization=shape["normalization"],
        gated_linear_unit=shape["gated_linear_unit"], activation_func=F.silu,
        add_bias_linear=shape["add_bias_linear"], qk_layernorm=shape["qk_layernorm"],
        use_cpu_initialization=True,
    )
    spec = get_gpt_layer_local_spec(normalization=shape["normalization"], qk_layernorm=shape["qk_layernorm"])
    model = GPTModel(config, spec, vocab_size=128, max_sequence_length=32,
                     share_embeddings_and_output_weights=shape["tied"],
                     position_embedding_type=shape["position"])
    built = sum(p.numel() for p in model.parameters())
    counted = count_parameters(config, 128, tied=shape["tied"], position_embedding_type=shape["position"],
                               max_position_embeddings=32)
    assert counted.total == built


# ---- the Megatron-LM patch -------------------------------------------------------------------------

def patch_files():
    """{target path: [(old_start, old_len, new_start, new_len, [lines])]} from a unified diff."""
    files, current, hunk = {}, None, None
    lines = PATCH.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- "):
            assert lines[i + 1].startswith("+++ "), f"line {i + 2}: '+++' must follow '---'"
            old, new = line[4:].split("\t")[0], lines[i + 1][4:].split("\t")[0]
            assert old.startswith("a/") and new.startswith("b/") and old[2:] == new[2:], (old, new)
            current = files.setdefault(new[2:], [])
            i += 2
            continue
        m = re.match(r"@@ -(\d+),(\d+) \+(\d+),(\d+) @@", line)
        if m:
            hunk = (*map(int, m.groups()), [])
            current.append(hunk)
        elif hunk is not None and line[:1] in (" ", "+", "-"):
            hunk[4].append(line)
        elif line == "\\ No newline at end of file":
            pass
        else:
            assert line.startswith(("diff --git ", "index ")), f"line {i + 1}: unexpected {line!r}"
            hunk = None
        i += 1
    return files


def added_code() -> str:
    return "\n".join(line[1:] for hunks in patch_files().values() for hunk in hunks
                     for line in hunk[4] if line.startswith("+"))


def test_patch_is_well_formed():
    files = patch_files()
    assert list(files) == ["pretrain_gpt.py"]
    for hunks in files.values():
        assert hunks
        shift = 0
        for old_start, old_len, new_start, new_len, body in hunks:
            assert sum(l[0] in " -" for l in body) == old_len
            assert sum(l[0] in " +" for l in body) == new_len
            assert new_start == old_start + shift  # earlier hunks' net lines move this one
            shift += new_len - old_len
    assert PATCH.name in (ROOT / "patches" / "README.md").read_text()


def test_patch_uses_existing_public_prores_names():
    """The patch imports only the training package's public API (its ``__all__``), nothing deeper."""
    import ast
    import importlib

    blocks, lines = [], iter(added_code().splitlines())
    for line in lines:  # each top-level import statement, with its parenthesised continuation
        if line.startswith(("from ", "import ")):
            block = [line]
            while "(" in block[0] and ")" not in block[-1]:
                block.append(next(lines))
            blocks.append("\n".join(block))
    imports = [node for block in blocks for node in ast.parse(block).body]
    ours = [node for node in imports if isinstance(node, ast.ImportFrom) and node.module.startswith("prores_megatron")]
    assert ours and not [node for node in imports if isinstance(node, ast.Import)]
    for node in ours:
        assert node.module == "prores_megatron.training", f"the patch imports from {node.module}"
        package = importlib.import_module(node.module)
        for alias in node.names:
            assert alias.name in package.__all__ and getattr(package, alias.name) is not None, alias.name


def test_patch_installs_the_cpu_shim_only_when_asked():
    """A GPU job on a node whose GPUs vanished must fail like stock Megatron-LM, not train on CPU."""
    code = added_code()
    assert code.count("install_cpu_shim()") == 1
    guard = code[:code.index("install_cpu_shim()")].rstrip().splitlines()
    assert any('os.environ.get("PRORES_CPU_SHIM") == "1"' in line for line in guard[-4:])
    assert "torch.cuda.is_available()" not in code


def test_patch_reads_every_prores_flag_through_the_shared_integration():
    """Every --prores-* flag is read by the patch or by prores_megatron.training.model_config (which the patch
    and the entry point share) and the resume check it installs, or documented in patches/README.md as
    not included."""
    from prores_megatron.training.arguments import add_prores_args

    code = added_code()
    assert "configure_model_config(model_cfg, args)" in code
    shared = "".join((ROOT / "prores_megatron" / "training" / name).read_text()
                     for name in ("model_config.py", "resume_check.py", "arguments.py", "training_monitor.py"))
    entry = (ROOT / "prores_megatron" / "training" / "pretrain_gpt.py").read_text()
    assert "configure_model_config(gpt_config_from_args(args), args)" in entry
    readme = (ROOT / "patches" / "README.md").read_text()
    flags = {a.dest: a.option_strings[0] for a in add_prores_args(argparse.ArgumentParser())._actions
             if a.dest.startswith("prores_")}
    # validate_prores_args folds --prores-total-warmup-steps into args.prores_warmup_steps.
    read = {d for d in flags if re.search(rf"\bargs\.{d}\b|\"{d}\"", code + shared)}
    read |= {"prores_total_warmup_steps"}
    dropped = {flags[d] for d in set(flags) - read if f"`{flags[d]}`" not in readme}
    assert not dropped, (f"neither the patch nor megatron_lm reads {sorted(dropped)}, and "
                         "patches/README.md does not list them: patched checkouts would ignore them")
    for d in re.findall(r"\bargs\.(prores_\w+)", code):
        assert d in flags, f"the patch reads args.{d}, which add_prores_args does not define"


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM_DIR"),
                    reason="set MEGATRON_LM_DIR to a core_r0.19.0 checkout")
def test_patch_trains_a_megatron_lm_checkout_on_cpu():
    """tools/check_megatron_patch.sh: applies cleanly, trains on CPU, same losses as the entry point."""
    checker = ROOT / "tools" / "check_megatron_patch.sh"
    proc = subprocess.run(["bash", str(checker), os.environ["MEGATRON_LM_DIR"]],
                          env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0 and "PASS" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
