"""--prores-* flags: validation right after parsing, and refusals through the real entry point."""

import argparse
import os
import subprocess
import sys
import warnings

import pytest

from prores_megatron.training.arguments import (
    ProResArgumentError,
    add_prores_args,
    describe_prores_args,
    validate_prores_args,
)


def parse(*flags, num_layers=12, train_iters=100000):
    parser = add_prores_args(argparse.ArgumentParser())
    args = parser.parse_args(list(flags))
    args.num_layers, args.train_iters = num_layers, train_iters
    validate_prores_args(args)
    return args


def test_per_layer_and_total_warmup():
    args = parse("--prores-schedule", "linear", "--prores-warmup-steps", "1000")
    assert (args.prores_schedule, args.prores_warmup_steps) == ("linear", 1000.0)
    args = parse("--prores-schedule", "linear", "--prores-total-warmup-steps", "1000", num_layers=24)
    assert args.prores_warmup_steps == pytest.approx(1000 / 24)  # non-integer T (paper Table 6)
    args = parse("--prores-schedule", "linear_equal", "--prores-total-warmup-steps", "300")
    assert (args.prores_schedule, args.prores_warmup_steps) == ("equal", 300.0)
    args = parse("--prores-schedule", "fix_sqrt_l")
    assert args.prores_schedule == "fix-inv-sqrt-layer" and args.prores_warmup_steps is None
    assert parse("--prores-schedule", "none").prores_schedule == "none"


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--prores-schedule", "linear_sqrt", "--prores-warmup-steps", "5"], "--prores-schedule: schedule='linear_sqrt'"),
        (["--prores-schedule", "linear"], "needs --prores-warmup-steps T"),
        (["--prores-schedule", "linear", "--prores-warmup-steps", "0"], "--prores-warmup-steps=0.0 must be a positive"),
        (["--prores-schedule", "linear", "--prores-warmup-steps", "-2"], "--prores-warmup-steps=-2.0 must be a positive"),
        (["--prores-schedule", "linear", "--prores-total-warmup-steps", "inf"], "--prores-total-warmup-steps=inf must be"),
        (["--prores-schedule", "linear", "--prores-warmup-steps", "nan"], "--prores-warmup-steps=nan must be"),
        (["--prores-schedule", "linear", "--prores-warmup-steps", "5", "--prores-total-warmup-steps", "60"],
         "mutually exclusive"),
        (["--prores-schedule", "linear", "--prores-warmup-steps", "5", "--prores-warmup-samples", "60"],
         "--prores-warmup-steps and --prores-warmup-samples are mutually exclusive"),
        (["--prores-schedule", "linear", "--prores-warmup-samples", "0"], "--prores-warmup-samples=0.0 must be a "
         "positive, finite number of samples"),
        (["--prores-schedule", "linear", "--prores-warmup-samples", "64", "--prores-start-step", "3"],
         "--prores-start-step counts iterations and --prores-warmup-samples counts samples"),
        (["--prores-schedule", "linear", "--prores-warmup-steps", "5", "--prores-log-interval", "0"],
         "--prores-log-interval=0 must be >= 1"),
        # ProRes is opt-in: every other --prores-* flag needs --prores-schedule, and says so.
        (["--prores-warmup-steps", "5"], "--prores-warmup-steps given without --prores-schedule: ProRes is off"),
        (["--prores-monitor-interval", "5", "--prores-arch", "post"],
         "--prores-arch, --prores-monitor-interval given without --prores-schedule"),
        (["--prores-trust-checkpoint"], "--prores-trust-checkpoint given without --prores-schedule"),
    ],
)
def test_refusals(flags, needle):
    with pytest.raises(ProResArgumentError, match=needle):
        parse(*flags)


def test_prores_is_off_without_prores_flags():
    args = parse()
    assert args.prores_enabled is False and args.prores_schedule is None
    assert describe_prores_args(args) == "ProRes: off (no --prores-schedule): the stock Megatron-LM model and loop"
    assert parse("--prores-schedule", "none").prores_enabled is True


def test_warmup_in_samples():
    """--prores-warmup-samples S: T is S (in samples), checked against --train-samples by hand:
    L = 12, S = 1000: every layer on at 12000 samples."""
    args = parse("--prores-schedule", "linear", "--prores-warmup-samples", "1000", train_iters=None)
    assert (args.prores_warmup_samples, args.prores_warmup_steps) == (1000.0, None)
    assert "S = 1000 samples per layer" in describe_prores_args(args)
    assert "every layer at alpha = 1 from 12000 consumed samples" in describe_prores_args(args)
    parser = add_prores_args(argparse.ArgumentParser())
    args = parser.parse_args(["--prores-schedule", "linear", "--prores-warmup-samples", "1000"])
    args.num_layers, args.train_iters, args.train_samples = 12, None, 6000
    with pytest.warns(UserWarning, match="warmup ends at 12000 samples .* --train-samples is 6000"):
        validate_prores_args(args)


def _ckpt(directory, tracker):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "latest_checkpointed_iteration.txt").write_text(tracker)
    return str(directory)


def test_fine_tuning_with_a_time_dependent_schedule_is_refused(tmp_path):
    """Runs that load a trained model at iteration 0 (Megatron-LM's load_checkpoint: --finetune, a
    --pretrained-checkpoint while --load holds none, a release checkpoint) are refused before any
    work, naming the flags and both ways out; a static schedule or --prores-rewarm-pretrained pass."""
    trained, release, empty = _ckpt(tmp_path / "a", "1000"), _ckpt(tmp_path / "r", "release"), str(tmp_path / "e")
    parser = add_prores_args(argparse.ArgumentParser())
    cases = {
        "--finetune (loading": dict(load=trained, finetune=True, pretrained_checkpoint=None),
        f"--pretrained-checkpoint {trained} (no checkpoint in --load {empty})":
            dict(load=empty, finetune=False, pretrained_checkpoint=trained),
        "a release checkpoint (--load": dict(load=release, finetune=False, pretrained_checkpoint=None),
    }
    for needle, extra in cases.items():
        args = parser.parse_args(["--prores-schedule", "linear", "--prores-warmup-steps", "5"])
        args.num_layers, args.train_iters = 12, 10**6
        vars(args).update(extra)
        with pytest.raises(ProResArgumentError) as err:
            validate_prores_args(args)
        text = str(err.value)
        assert needle in text and "--prores-schedule none" in text and "--prores-rewarm-pretrained" in text, text
        args = parser.parse_args(["--prores-schedule", "linear", "--prores-warmup-steps", "5",
                                  "--prores-rewarm-pretrained"])
        args.num_layers, args.train_iters = 12, 10**6
        vars(args).update(extra)
        validate_prores_args(args)
        assert "--prores-rewarm-pretrained: the pretrained model starts at alpha(l, 0)" in describe_prores_args(args)
        args = parser.parse_args(["--prores-schedule", "fix-inv-depth"])
        args.num_layers, args.train_iters = 12, 10**6
        vars(args).update(extra)
        validate_prores_args(args)  # static: no warmup to restart
    # Resuming a fine-tuning run: --load holds its checkpoint, so --pretrained-checkpoint is not loaded.
    args = parser.parse_args(["--prores-schedule", "linear", "--prores-warmup-steps", "5"])
    args.num_layers, args.train_iters = 12, 10**6
    vars(args).update(load=trained, finetune=False, pretrained_checkpoint=release)
    validate_prores_args(args)


def test_warnings():
    with pytest.warns(UserWarning, match=r"warmup ends at step 12000 .* --train-iters is 5000"):
        parse("--prores-schedule", "linear", "--prores-warmup-steps", "1000", train_iters=5000)
    with pytest.warns(UserWarning, match="does not depend on the step"):
        parse("--prores-schedule", "fix-inv-depth", "--prores-warmup-steps", "3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse("--prores-schedule", "linear", "--prores-warmup-steps", "10", train_iters=1000)


def test_entry_point_refuses_before_any_work(tmp_path):
    """A bad flag through Megatron-LM's own parser: exit 2, the flag named, nothing written."""
    save = tmp_path / "ckpt"
    cmd = [
        sys.executable, "-m", "prores_megatron.training.pretrain_gpt",
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
        "--seq-length", "16", "--max-position-embeddings", "16", "--micro-batch-size", "1",
        "--train-iters", "4", "--eval-interval", "2", "--lr", "1e-3",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64",
        "--distributed-backend", "gloo", "--transformer-impl", "local",
        "--no-rope-fusion", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
        "--save", str(save), "--save-interval", "2",
    ]
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29599", OMP_NUM_THREADS="1")
    proc = subprocess.run([*cmd, "--prores-schedule", "linear"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: --prores-schedule linear warms layers up over time and needs --prores-warmup-steps" in proc.stderr
    assert not save.exists()
    # Megatron-LM pretrain_gpt.py features this entry point lacks are refused by name (docs/megatron.md §3).
    # --inprocess-restart is honoured as in Megatron-LM's pretrain_gpt.py: its wrapper runs first (here,
    # without nvidia-resiliency-ext, it says so and trains unwrapped, as upstream does), never dropped.
    from prores_megatron.utils import free_port

    env["MASTER_PORT"] = str(free_port())
    proc = subprocess.run([*cmd, "--sft", "--inprocess-restart"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: --sft: SFT datasets" in proc.stderr and "with the ProRes patch" in proc.stderr
    assert "In-process restart is not available" in proc.stdout + proc.stderr
    assert not save.exists()


def test_arch_and_init_flags():
    args = parse("--prores-schedule", "linear", "--prores-warmup-steps", "5", "--prores-arch", "deepnorm", "--prores-init", "deepnorm")
    assert (args.prores_arch, args.prores_init) == ("deepnorm", "deepnorm")
    assert parse("--prores-schedule", "linear", "--prores-warmup-steps", "5").prores_arch == "pre"
    with pytest.raises(SystemExit):  # argparse choices: unknown arch / init
        parse("--prores-schedule", "linear", "--prores-warmup-steps", "5", "--prores-arch", "resnet")


@pytest.mark.parametrize(
    "extra,arch,needle",
    [
        (dict(sequence_parallel=True, transformer_impl="local"), "pre", "--sequence-parallel needs norms"),
        (dict(num_experts=8, transformer_impl="transformer_engine"), "post", "--prores-arch post supports dense MLPs only"),
        (dict(use_transformer_engine_op_fuser=True, transformer_impl="transformer_engine"), "lns", "--use-transformer-engine-op-fuser"),
        (dict(heterogeneous_layers_config_path="h.json"), "sandwich", "--heterogeneous-layers-config-path"),
        (dict(use_kitchen=True), "deepnorm", "--prores-arch deepnorm builds its norms .* drop --use-kitchen"),
        (dict(use_grouped_gemm_for_dense_mlp=True), "post", "--use-grouped-gemm-for-dense-mlp"),
        (dict(prores_start_step=-1), "pre", "--prores-start-step=-1 must be >= 0"),
        (dict(prores_init="ds", mtp_num_layers=1), "pre", "--prores-init ds .* no rules for the MTP layers"),
        (dict(prores_monitor_interval=5, cuda_graph_impl="full_iteration"), "pre",
         "--prores-monitor-interval with --cuda-graph-impl full_iteration: a replayed graph skips"),
    ],
)
def test_arch_combinations_refused(extra, arch, needle):
    parser = add_prores_args(argparse.ArgumentParser())
    args = parser.parse_args(["--prores-schedule", "linear", "--prores-warmup-steps", "5", "--prores-arch", arch])
    args.num_layers, args.train_iters = 12, 10**6
    for k, v in extra.items():
        setattr(args, k, v)
    with pytest.raises(ProResArgumentError, match=needle):
        validate_prores_args(args)


def test_start_step_and_mtp_are_described():
    args = parse("--prores-schedule", "linear", "--prores-warmup-steps", "5", "--prores-start-step", "100")
    assert args.prores_start_step == 100
    args.mtp_num_layers = 2
    text = describe_prores_args(args)
    # L = 12 (parse's default here), linear T = 5: every layer on at step 60, i.e. iteration 160.
    assert "every layer at alpha = 1 from step 60 (t = iteration - 100: --prores-start-step 100, " \
           "alpha = 1 from iteration 160)" in text
    assert "the 2 MTP layer(s) (--mtp-num-layers) are prediction heads after the trunk" in text
    assert "unscaled (alpha = 1)" in text
    assert "MTP" not in describe_prores_args(parse("--prores-schedule", "linear", "--prores-warmup-steps", "5"))
