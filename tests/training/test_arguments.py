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
    args = parse("--prores-warmup-steps", "1000")
    assert (args.prores_schedule, args.prores_warmup_steps) == ("linear", 1000.0)
    args = parse("--prores-total-warmup-steps", "1000", num_layers=24)
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
        ([], "needs --prores-warmup-steps T"),
        (["--prores-warmup-steps", "0"], "--prores-warmup-steps=0.0 must be a positive"),
        (["--prores-warmup-steps", "-2"], "--prores-warmup-steps=-2.0 must be a positive"),
        (["--prores-total-warmup-steps", "inf"], "--prores-total-warmup-steps=inf must be"),
        (["--prores-warmup-steps", "nan"], "--prores-warmup-steps=nan must be"),
        (["--prores-warmup-steps", "5", "--prores-total-warmup-steps", "60"], "mutually exclusive"),
    ],
)
def test_refusals(flags, needle):
    with pytest.raises(ProResArgumentError, match=needle):
        parse(*flags)


def test_warnings():
    with pytest.warns(UserWarning, match=r"warmup ends at step 12000 .* --train-iters is 5000"):
        parse("--prores-warmup-steps", "1000", train_iters=5000)
    with pytest.warns(UserWarning, match="does not depend on the step"):
        parse("--prores-schedule", "fix-inv-depth", "--prores-warmup-steps", "3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse("--prores-warmup-steps", "10", train_iters=1000)


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
        "--save", str(save), "--save-interval", "2", "--prores-schedule", "linear",
    ]
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29599", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: --prores-schedule linear warms layers up over time and needs --prores-warmup-steps" in proc.stderr
    assert not save.exists()


def test_arch_and_init_flags():
    args = parse("--prores-warmup-steps", "5", "--prores-arch", "deepnorm", "--prores-init", "deepnorm")
    assert (args.prores_arch, args.prores_init) == ("deepnorm", "deepnorm")
    assert parse("--prores-warmup-steps", "5").prores_arch == "pre"
    with pytest.raises(SystemExit):  # argparse choices: unknown arch / init
        parse("--prores-warmup-steps", "5", "--prores-arch", "resnet")


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
    args = parser.parse_args(["--prores-warmup-steps", "5", "--prores-arch", arch])
    args.num_layers, args.train_iters = 12, 10**6
    for k, v in extra.items():
        setattr(args, k, v)
    with pytest.raises(ProResArgumentError, match=needle):
        validate_prores_args(args)


def test_start_step_and_mtp_are_described():
    args = parse("--prores-warmup-steps", "5", "--prores-start-step", "100")
    assert args.prores_start_step == 100
    args.mtp_num_layers = 2
    text = describe_prores_args(args)
    # L = 12 (parse's default here), linear T = 5: every layer on at step 60, i.e. iteration 160.
    assert "every layer at alpha = 1 from step 60 (t = iteration - 100: --prores-start-step 100, " \
           "alpha = 1 from iteration 160)" in text
    assert "the 2 MTP layer(s) (--mtp-num-layers) are prediction heads after the trunk" in text
    assert "unscaled (alpha = 1)" in text
    assert "MTP" not in describe_prores_args(parse("--prores-warmup-steps", "5"))
