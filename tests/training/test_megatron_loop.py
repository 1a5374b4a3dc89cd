"""End to end through Megatron-LM's real pretrain() loop on CPU: stop mid-warmup, resume, compare.

For world size 1, TP2 and PP2 the tiny CPU script runs 6 steps straight, and again as 3 steps +
resume to 6 (world size 1: stopped by --exit-interval 3; TP2 and PP2: resumed from the straight
run's own checkpoint at 3, one launch fewer each). Loss, grad norm and alpha per layer (read back
from Megatron's TensorBoard events, at full precision) must be bit-identical, alpha must equal the
schedule at t = iteration - 1, and the log must carry the alpha lines and the coverage check.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from prores_megatron.utils import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "scripts" / "pretrain_tiny_cpu.sh"
ITERS, STOP, L, T = 6, 3, 8, 1.0


def hand_alpha(step):
    """The linear schedule by hand, alpha(l, t) = min(t / (T l), 1), as the fp32 buffer stores it."""
    return [torch.tensor(min(step / (T * l), 1.0), dtype=torch.float32).item() for l in range(1, L + 1)]

# The monitor is on (every 2 iterations) with a spike window short enough to judge steps 3..5.
PRORES = (f"--prores-schedule linear --prores-warmup-steps {T:g} --prores-monitor-interval 2 "
          "--prores-spike-window 4 --prores-spike-min-history 2 --prores-log-alpha-per-layer")


def launch(tmp: Path, name: str, tp: int, pp: int, save: Path, exit_interval=None, extra=""):
    env = dict(os.environ, PYTHON=sys.executable, TP=str(tp), PP=str(pp), TRAIN_ITERS=str(ITERS),
               MASTER_PORT=str(free_port()))
    env.update(SAVE_DIR=str(save), PRORES_ARGS=PRORES)
    env["EXTRA_ARGS"] = f"--tensorboard-dir {tmp / ('tb_' + name)} --eval-interval 1000 --eval-iters 1 {extra}"
    if exit_interval:
        env["EXIT_INTERVAL"] = str(exit_interval)
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    (tmp / f"{name}.log").write_text(log)
    assert proc.returncode == 0, log[-4000:]
    return log


def scalars(tb_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


LAYOUTS = {"ws1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


def _stopped_copy(straight: Path, split: Path):
    """What a run stopped after STOP leaves, from the straight run (which saved at STOP too): its
    checkpoints up to STOP, the tracker at STOP, the monitor records of iterations up to STOP."""
    shutil.copytree(straight, split, ignore=lambda d, names: [n for n in names if n.startswith("iter_")
                                                                and int(n[5:]) > STOP])
    (split / "latest_checkpointed_iteration.txt").write_text(str(STOP))
    kept = [r for r in read_jsonl(straight / "prores_monitor.jsonl")
            if r["kind"] == "run" or (r["kind"] in ("step", "layers") and r["iteration"] <= STOP)]
    (split / "prores_monitor.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))


def _resume_chain(tmp: Path, tp: int, pp: int, stop_by_exit: bool):
    """The split run: stopped by --exit-interval STOP then resumed (world size 1, Megatron's own stop),
    or resumed from the straight run's checkpoint at STOP (TP2, PP2: one launch fewer each)."""
    if stop_by_exit:
        first = launch(tmp, "first", tp, pp, tmp / "ckpt_split", exit_interval=STOP)
        return first, launch(tmp, "resumed", tp, pp, tmp / "ckpt_split")
    straight = launch(tmp, "straight", tp, pp, tmp / "ckpt_straight", extra=f"--save-interval {STOP}")
    _stopped_copy(tmp / "ckpt_straight", tmp / "ckpt_split")
    return straight, launch(tmp, "resumed", tp, pp, tmp / "ckpt_split")


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Every training of this module's fixtures in one pool, two at a time, longest chains first
    (on 2 cores the launches are CPU-bound start-up; packing them saves idle time between fixtures)."""
    tmps = {name: tmp_path_factory.mktemp(f"loop_{name}") for name in LAYOUTS}
    dirs = {arch: tmp_path_factory.mktemp(f"arch_{arch}") for arch, _ in ARCH_INIT}
    with ThreadPoolExecutor(max_workers=2) as pool:
        chains = {name: pool.submit(_resume_chain, tmps[name], *LAYOUTS[name], name == "ws1")
                  for name in ("tp2", "pp2", "ws1")}
        ws1_straight = pool.submit(launch, tmps["ws1"], "straight", 1, 1, tmps["ws1"] / "ckpt_straight")
        archs = {arch: pool.submit(_train_arch, dirs[arch], arch, init) for arch, init in ARCH_INIT}
        moe_dir = tmp_path_factory.mktemp("moe")
        moe = pool.submit(_train_moe, moe_dir)
        samples_dir = tmp_path_factory.mktemp("samples_dp2")
        samples = pool.submit(_samples_chain, samples_dir)
        resume = {}
        for name, chain in chains.items():
            first, resumed = chain.result()
            if name == "ws1":
                resume[name] = dict(straight=ws1_straight.result(), first=first, resumed=resumed)
            else:  # the straight run was the chain's first launch
                resume[name] = dict(straight=first, first=None, resumed=resumed)
        return dict(tmp=tmps, resume=resume, arch={arch: (dirs[arch], archs[arch].result()) for arch in dirs},
                    moe=(moe_dir, moe.result()), samples=(samples_dir, samples.result()))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def runs(request, launches):
    name = request.param
    tmp, logs = launches["tmp"][name], launches["resume"][name]
    straight = scalars(tmp / "tb_straight")
    merged = {}
    if logs["first"] is not None:
        parts = [scalars(tmp / "tb_first")]
    else:
        parts = [{tag: {i: v for i, v in values.items() if i <= STOP} for tag, values in straight.items()}]
    for part in parts + [scalars(tmp / "tb_resumed")]:
        for tag, values in part.items():
            merged.setdefault(tag, {}).update(values)
    return dict(
        monitor_straight=read_jsonl(tmp / "ckpt_straight" / "prores_monitor.jsonl"),
        monitor_split=read_jsonl(tmp / "ckpt_split" / "prores_monitor.jsonl"),
        straight=straight,
        split=merged,
        logs=logs,
        tmp=tmp,
    )


def test_resume_is_bit_exact(runs):
    straight, split = runs["straight"], runs["split"]
    for tag in ("lm loss", "grad-norm"):
        assert sorted(straight[tag]) == list(range(1, ITERS + 1))
        assert split[tag] == straight[tag], tag  # exact float equality, every iteration
    print("\nlm loss per iteration:", [straight["lm loss"][i] for i in range(1, ITERS + 1)])
    print("grad norm per iteration:", [straight["grad-norm"][i] for i in range(1, ITERS + 1)])
    # The loss moved: the comparison is not between two frozen runs.
    assert straight["lm loss"][ITERS] < straight["lm loss"][1]


def test_alpha_in_tensorboard_follows_the_schedule(runs):
    """TensorBoard's alpha is read from the model's buffers before each train_step (gathered over
    the pipeline), so it is what the kernels used: exactly the fp32 hand value at t = iteration - 1."""
    for run in (runs["straight"], runs["split"]):
        for iteration in range(1, ITERS + 1):
            got = [run[f"prores/alpha/layer_{l:03d}"][iteration] for l in range(1, L + 1)]
            hand = hand_alpha(iteration - 1)
            assert got == hand, iteration
            # The summary written by default (TensorBoard stores float32).
            assert run["prores/alpha_min"][iteration] == min(hand) and run["prores/alpha_max"][iteration] == max(hand)
            assert run["prores/alpha_mean"][iteration] == pytest.approx(sum(hand) / L, rel=1e-6)
            assert run["prores/layers_warming"][iteration] == sum(a < 1 for a in hand)
    # Mid-warmup at the stop: some layers on, some still ramping.
    assert 0 < hand_alpha(STOP).count(1.0) < L


def test_training_log_has_alpha_and_coverage(runs):
    straight_log, resumed_log = runs["logs"]["straight"], runs["logs"]["resumed"]
    for log in filter(None, runs["logs"].values()):
        assert f"ProRes coverage check passed: global layers 1..{L} each built once" in log
    lines = re.findall(r"\[ProRes\] iteration\s+(\d+) \| (?:first step of this launch: [^|]*\| )?step t=(\d+) "
                       r".*alpha per layer: (.*)", straight_log)
    assert [int(i) for i, _, _ in lines] == list(range(1, ITERS + 1))
    for iteration, step, values in lines:
        assert int(step) == int(iteration) - 1
        assert [float(v) for v in values.split()] == pytest.approx(hand_alpha(int(step)), rel=1e-3)
    resumed_iters = [int(i) for i in re.findall(r"\[ProRes\] iteration\s+(\d+)", resumed_log)]
    assert resumed_iters == list(range(STOP + 1, ITERS + 1))
    assert re.search(rf"\[ProRes\] iteration\s+{STOP + 1} \| first step of this launch: schedule linear", resumed_log)
    assert "ProRes warmup ends at step 8" in straight_log  # warmup longer than --train-iters


def test_monitor_records(runs):
    """The monitor JSONL: every iteration's loss (as TensorBoard has it), per-layer statistics every
    2 iterations, the same after a resume, and online spike scores equal to the offline ones."""
    import math

    import numpy as np

    from prores_megatron.monitoring.spike_score import SpikeConfig, spike_score

    straight, split, tb = runs["monitor_straight"], runs["monitor_split"], runs["straight"]
    kinds = [r["kind"] for r in straight]
    assert kinds[0] == "run" and kinds[-1] == "spikes" and kinds.count("step") == ITERS
    assert [r["kind"] for r in split].count("run") == 2  # one per launch
    steps = {r["iteration"]: r for r in straight if r["kind"] == "step"}
    for i, rec in steps.items():
        assert np.float32(rec["lm_loss"]) == np.float32(tb["lm loss"][i])
        assert np.float32(rec["grad_norm"]) == np.float32(tb["grad-norm"][i])
    layers = [r for r in straight if r["kind"] == "layers"]
    assert [r["iteration"] for r in layers] == [2, 4, 6]
    for rec in layers:
        # The model's alpha buffers (fp32), against linear's min(t / (T l), 1) by hand.
        assert rec["alpha"] == [torch.tensor(min(rec["step"] / (T * l), 1.0), dtype=torch.float32).item()
                                for l in range(1, L + 1)]
        for key in ("attn_rms", "mlp_rms", "resid_rms", "resid_norm", "grad_norm"):
            assert len(rec[key]) == L and all(v > 0 and math.isfinite(v) for v in rec[key]), key
        # The layers' gradients are part of the global gradient (with embedding, output, final norm).
        assert math.sqrt(sum(g * g for g in rec["grad_norm"])) < steps[rec["iteration"]]["grad_norm"]
        # A token's L2 norm is sqrt(hidden) x its RMS on average (equal for uniform tokens): same order.
        for rms, norm in zip(rec["resid_rms"], rec["resid_norm"]):
            assert 0.5 * rms * 8 < norm <= rms * 8 + 1e-6  # hidden 64: sqrt(64) = 8
    split_layers = [r for r in split if r["kind"] == "layers"]
    assert split_layers == layers  # bit-exact after the resume, like the loss
    config = SpikeConfig(window=4, threshold=7.0, min_history=2)
    for key, name in (("lm_loss", "loss_score"), ("grad_norm", "grad_norm_score")):
        offline = spike_score([steps[i][key] for i in range(1, ITERS + 1)], config=config)
        for run in (straight, split):
            spikes = [r for r in run if r["kind"] == "spikes"][-1]
            assert spikes[name] == offline.score and spikes["evaluated_steps"] == offline.evaluated == 3


ARCH_INIT = [("pre", "ds"), ("post", "plain"), ("sandwich", "scaled"), ("deepnorm", "deepnorm"), ("lns", "megatron")]


def _train_arch(tmp: Path, arch: str, init: str):
    # World size 1: pipeline and tensor splits of every architecture are the cross-layout oracle's
    # (bit for bit against world size 1, tests/end_to_end); the PP=2 loop is the resume fixture's.
    env = dict(os.environ, PYTHON=sys.executable, TP="1", PP="1", TRAIN_ITERS="8", SAVE_DIR=str(tmp / "ckpt"),
               MASTER_PORT=str(free_port()))
    env["PRORES_ARGS"] = f"--prores-schedule linear --prores-warmup-steps 0.5 --prores-arch {arch} --prores-init {init}"
    env["EXTRA_ARGS"] = f"--tensorboard-dir {tmp / 'tb'} --eval-interval 1000 --eval-iters 1 --save-interval 8"
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("arch,init", ARCH_INIT, ids=[a for a, _ in ARCH_INIT])
def test_every_arch_trains_through_megatron_lm(launches, arch, init):
    """Each residual architecture (with one of the inits) through the real loop, and its torch_dist save."""
    tmp_path, proc = launches["arch"][arch]
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert f"ProRes: arch {arch}, init {init}" in log
    loss = scalars(tmp_path / "tb")["lm loss"]
    values = [loss[i] for i in sorted(loss)]
    print(f"\n{arch}/{init} lm loss:", " ".join(f"{v:.4f}" for v in values))
    assert len(values) == 8 and all(v == v and abs(v) < 1e4 for v in values)
    assert values[-1] < values[0] - 0.1
    assert (tmp_path / "ckpt" / "iter_0000008").is_dir()  # torch_dist save of the arch's modules


def _train_moe(tmp_path: Path):
    env = dict(os.environ, PYTHON=sys.executable, TP="1", PP="1", TRAIN_ITERS="4", SAVE_DIR=str(tmp_path / "ckpt"))
    env["PRORES_ARGS"] = (f"--prores-schedule linear --prores-warmup-steps {T:g} --prores-monitor-interval 1 "
                          "--prores-spike-window 4 --prores-spike-min-history 2")
    env["EXTRA_ARGS"] = ("--num-experts 4 --moe-layer-freq ([0]+[1])*4 --moe-router-topk 2 --moe-ffn-hidden-size 64 "
                         "--moe-aux-loss-coeff 0.01 --eval-interval 1000 --eval-iters 1 --save-interval 1000 "
                         "--iterations-to-skip 3")
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)


def test_moe_through_megatron_lm_at_alpha_zero(launches):
    """MoE (--moe-layer-freq: layers 2, 4, 6, 8) through the real loop, world size 1, monitor on.
    At iteration 1 (t = 0, alpha = 0) a dense layer's gradient is exactly zero and an MoE layer's is
    only its router's, from the load-balancing loss; from iteration 2 every layer learns.
    ``--iterations-to-skip 3``: Megatron skips iteration 3 (no training_log); the monitor records it
    as not trained and goes on, and iteration 4 runs at t = 3, Megatron's iteration count."""
    tmp_path, proc = launches["moe"]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    records = read_jsonl(tmp_path / "ckpt" / "prores_monitor.jsonl")
    layers = {r["iteration"]: r for r in records if r["kind"] == "layers"}
    assert sorted(layers) == [1, 2, 4]
    first = layers[1]
    assert first["alpha"] == [0.0] * L
    for l, g in enumerate(first["grad_norm"], start=1):
        assert (g > 0) == (l % 2 == 0), (l, first["grad_norm"])  # dense: 0; MoE: the router's
    for iteration in (2, 4):
        assert all(g > 0 for g in layers[iteration]["grad_norm"]), iteration
    assert layers[4]["alpha"] == hand_alpha(3)  # min(3 / l, 1): 1, 1, 1, 0.75, 0.6, 0.5, 3/7, 0.375
    steps = {r["iteration"]: r for r in records if r["kind"] == "step"}
    assert sorted(steps) == [1, 2, 3, 4] and steps[3]["not_trained"] and steps[3]["lm_loss"] is None
    assert [r for r in records if r["kind"] == "spikes"]  # the monitor finished the run


# A sample-counted warmup at DP2 under a batch-size ramp-up (--step-batch-size-schedule; megatron-core
# 0.19 ignores the deprecated --rampup-batch-size): micro-batch 2 x DP 2, global batch 4 until 512
# tokens (8 samples of 64 tokens), then 8; 40 samples = 6 iterations consuming 4, 4, 8, 8, 8, 8.
SAMPLES_PRORES = "--prores-schedule linear --prores-warmup-samples 8 --prores-monitor-interval 1"


def _train_samples(tmp: Path, name: str, extra: str, save: Path, exit_interval=None):
    env = dict(os.environ, PYTHON=sys.executable, TP="1", PP="1", DP="2", TRAIN_SAMPLES="40",
               BATCH_SCHEDULE="0:4 512:8", SAVE_DIR=str(save), PRORES_ARGS=SAMPLES_PRORES,
               MASTER_PORT=str(free_port()))
    env["EXTRA_ARGS"] = f"--eval-interval 1000 --eval-iters 1 --tensorboard-dir {tmp / ('tb_' + name)} {extra}"
    if exit_interval:
        env["EXIT_INTERVAL"] = str(exit_interval)
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    (tmp / f"{name}.log").write_text(proc.stdout + proc.stderr)
    return proc


def _samples_chain(tmp: Path):
    """The distributed optimizer straight through (it cannot resume on CPU: docs/megatron.md §4), and
    the plain DDP run stopped after 3 iterations and resumed."""
    dist = _train_samples(tmp, "dist", "--use-distributed-optimizer --save-interval 1000", tmp / "ckpt_dist")
    first = _train_samples(tmp, "first", "--save-interval 1000", tmp / "ckpt_plain", exit_interval=3)
    resumed = _train_samples(tmp, "resumed", "--save-interval 1000", tmp / "ckpt_plain")
    return dict(dist=dist, first=first, resumed=resumed)


def test_sample_counted_warmup_under_ramp_up_and_distributed_optimizer(launches):
    """Item by item, against hand values and the same run without the distributed optimizer:
    - alpha(l) = min(s / (8 l), 1) with s = 0, 4, 8, 16, 24, 32 (the samples of completed steps under
      the ramp-up) at iterations 1..6, read from the model's buffers by the monitor, also after the
      resume at 3 (s restored from the checkpoint);
    - per-layer gradient norms under --use-distributed-optimizer (each rank's shard, all-reduced)
      equal those of plain DDP to float rounding (relative 1e-6; Megatron's own global grad norms of
      the two runs differ by the same order), where the monitor used to log null."""
    tmp, procs = launches["samples"]
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, (proc.stdout + proc.stderr)[-4000:])
    s_hand = [0, 4, 8, 16, 24, 32]
    # Both launches append to one file.
    plain = {r["iteration"]: r for r in read_jsonl(tmp / "ckpt_plain" / "prores_monitor.jsonl") if r["kind"] == "layers"}
    dist = {r["iteration"]: r for r in read_jsonl(tmp / "ckpt_dist" / "prores_monitor.jsonl") if r["kind"] == "layers"}
    assert sorted(plain) == sorted(dist) == list(range(1, 7))
    for i, s in enumerate(s_hand, start=1):
        hand = [torch.tensor(min(s / (8.0 * l), 1.0), dtype=torch.float32).item() for l in range(1, L + 1)]
        assert plain[i]["alpha"] == hand and dist[i]["alpha"] == hand, (i, s)
        if i == 1:  # alpha = 0: the layers' gradients are exactly zero, in both runs
            assert dist[i]["grad_norm"] == plain[i]["grad_norm"] == [0.0] * L
            continue
        assert dist[i]["grad_norm"] is not None and all(g > 0 for g in dist[i]["grad_norm"]), i
        assert dist[i]["grad_norm"] == pytest.approx(plain[i]["grad_norm"], rel=1e-6, abs=0), i
    log = procs["resumed"].stdout + procs["resumed"].stderr
    assert re.search(r"\[ProRes\] iteration\s+4 \| first step of this launch: schedule linear, S = 8 samples, "
                     r"--prores-start-step 0 \| samples s=16 ", log), log[-3000:]
    assert re.findall(r"consumed samples:\s+(\d+)", procs["dist"].stdout) == ["4", "8", "16", "24", "32", "40"]
