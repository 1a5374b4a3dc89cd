"""tools/gpu_check.py, the GPU check, kept honest on CPU: the items that need no GPU pass here, the
GPU items say SKIP (not PASS), and a failing item makes the command fail."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.py"


def test_cpu_capable_items_pass_and_gpu_items_skip():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--allow-cpu", "--items", "fp32_alpha,graphs"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = [ln for ln in proc.stdout.splitlines() if ln.split(" ")[0] in ("PASS", "FAIL", "SKIP")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [ln.split(" ")[:2] for ln in lines] == [["PASS", "fp32_alpha"], ["SKIP", "graphs"]]


def test_a_failing_item_fails_the_command(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    gpu_check.CHECKS["kernel"] = lambda: (False, "max |fused - reference| = 0.5")

    def crash():
        raise RuntimeError("boom")

    gpu_check.CHECKS["fp32_alpha"] = crash
    assert gpu_check.main(["--allow-cpu", "--items", "kernel,fp32_alpha"]) == 1
    out = capsys.readouterr().out
    assert "FAIL kernel" in out and "FAIL fp32_alpha" in out and "RuntimeError: boom" in out


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exact_fp32(value):
    """A Fraction rounded to the nearest fp32 (ties to even), by exact arithmetic: the independent
    reference for the FMA emulation (normal numbers only)."""
    from fractions import Fraction

    if value == 0:
        return 0.0
    sign, x = (1, value) if value > 0 else (-1, -value)
    e = x.numerator.bit_length() - x.denominator.bit_length()  # 2^e <= x < 2^(e+2)
    while Fraction(2) ** e > x:
        e -= 1
    while Fraction(2) ** (e + 1) <= x:
        e += 1
    scaled = x / Fraction(2) ** (e - 23)  # in [2^23, 2^24)
    low = scaled.numerator // scaled.denominator
    rest = scaled - low
    m = low + (1 if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and low % 2) else 0)
    return sign * float(Fraction(m) * Fraction(2) ** (e - 23))


def test_fma_emulation_is_the_exactly_rounded_multiply_add():
    from fractions import Fraction

    import torch

    gc = load_gpu_check()
    # Hand case: (1 + 2^-12)^2 - 1 = 2^-11 + 2^-24 exactly (an FMA keeps it); rounding the product
    # first loses 2^-24 (a tie, to even), leaving 2^-11.
    a = torch.tensor([1 + 2**-12], dtype=torch.float32)
    fma = gc.fma_fp32(a, a, torch.tensor([-1.0]))
    assert fma.item() == 2**-11 + 2**-24
    separate, fused = gc.residual_references(torch.tensor([-1.0]), a, a)
    assert (separate.item(), fused.item()) == (2**-11, 2**-11 + 2**-24)
    # Inputs whose fp64 sum lands exactly half-way between two fp32 values although the exact value
    # lies above it (found by search; the expected values come from exact rational arithmetic).
    ties = [(float.fromhex("0x1.00167ep+0"), float.fromhex("0x1.ffd308p-25")),
            (float.fromhex("0x1.00169ep+0"), float.fromhex("0x1.ffd2c8p-25"))]
    g = torch.Generator().manual_seed(3)
    xs = [*(t[0] for t in ties), *torch.randn(200, generator=g).tolist()]
    ys = [*(t[1] for t in ties), *(torch.randn(200, generator=g) * 1e-3).tolist()]
    cs = [1.0, 1.0, *torch.randn(200, generator=g).tolist()]
    x, y, c = (torch.tensor(v, dtype=torch.float32) for v in (xs, ys, cs))
    got = gc.fma_fp32(x, y, c).tolist()
    want = [exact_fp32(Fraction(a) * Fraction(b) + Fraction(cc)) for a, b, cc in zip(x.tolist(), y.tolist(), c.tolist())]
    assert got == want
    naive = (x.double() * y.double() + c.double()).float().tolist()  # double rounding: wrong at the ties
    assert naive[:2] != want[:2]


def test_kernel_comparison_accepts_either_rounding_and_nothing_else():
    import torch

    gc = load_gpu_check()
    g = torch.Generator().manual_seed(0)
    n = 65536  # the kernel item's shape and dtypes: bf16 branch, bias and residual, y formed in fp32
    x, b, r = (torch.randn(n, generator=g).to(torch.bfloat16) for _ in range(3))
    y = x.float() + b.float()
    alpha = torch.tensor(1 / 3)
    separate, fused = gc.residual_references(r, alpha, y)
    differ = int((separate != fused).sum())
    assert 0 < differ < n // 100  # bf16 at alpha = 1/3: a few elements differ by one bf16 step
    mixed = torch.where(torch.arange(n) % 2 == 0, separate, fused)  # an FMA kernel on some lanes only
    for out in (separate, fused, mixed):
        ok, counts = gc.match_either(out, separate, fused)
        assert ok and counts["neither"] == 0 and sum(counts.values()) == n
    assert gc.match_either(fused, separate, fused)[1]["fma"] == int((fused != separate).sum()) > 0
    off = separate.clone()
    same = int((separate == fused).nonzero()[0])
    off.view(torch.int16)[same] += 1  # one bf16 step away from both roundings
    ok, counts = gc.match_either(off, separate, fused)
    assert not ok and counts["neither"] == 1


def test_graphs_item_reports_every_run_when_the_eager_run_fails(monkeypatch):
    import torch

    gc = load_gpu_check()
    good_log = "".join(f" iteration {i}/ 8 | lm loss: {7 - i / 10:.6E} |\n [ProRes] iteration {i:8d} | t | "
                       f"alpha per layer: " + " ".join(f"{gc.hand_alpha(i - 1, l, 1.0):.4g}" for l in range(1, 9))
                       + "\n" for i in range(1, 9))
    runs = {"none": (1, "Traceback\nRuntimeError: eager broke"), "local": (0, good_log),
            "full_iteration": (0, "half\nValueError: graph broke")}
    monkeypatch.setattr(gc, "device", lambda: torch.device("cuda"))
    monkeypatch.setattr(gc, "have_te", lambda: False)
    monkeypatch.setattr(gc, "launch_loop", lambda argv, port, timeout=420: " ".join(argv))
    mode_of = lambda argv: "local" if "local" in argv.split("--cuda-graph-impl ")[-1][:6] and "--cuda-graph-impl" in argv \
        else "full_iteration" if "full_iteration" in argv else "none"
    monkeypatch.setattr(gc, "collect", lambda proc: runs[mode_of(proc)])
    ok, detail = gc.check_graphs()
    assert not ok
    assert "eager broke" in detail and "graph broke" in detail and "not compared" in detail
    assert "local: alpha max rel err" in detail


def test_te_items_skip_by_name_without_transformer_engine(monkeypatch, capsys):
    import torch

    gc = load_gpu_check()
    monkeypatch.setattr(gc, "device", lambda: torch.device("cuda"))
    monkeypatch.setattr(gc, "have_te", lambda: False)
    assert gc.main(["--allow-cpu", "--items", "te_train,fp8_grads"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("PASS", "FAIL", "SKIP"))]
    assert [ln.split(" ")[:2] for ln in lines] == [["SKIP", "te_train"], ["SKIP", "fp8_grads"]]
    assert all(ln.endswith("Transformer Engine not importable") for ln in lines)


def test_gpu_loop_arguments_rehearse_on_cpu_with_the_shim_off():
    """The rehearsal CI runs: every GPU loop configuration through Megatron-LM's argument validation,
    gpt_config_from_args and the build with the shim off and TE, apex, wandb, omegaconf and
    flask_restful blocked; each fusion flag shown necessary; a real two-iteration loop."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rehearse"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("PASS rehearse", "FAIL rehearse"))]
    names = [ln.split(":")[0].split(" ", 2)[2] for ln in lines]
    assert proc.returncode == 0 and all(ln.startswith("PASS") for ln in lines), "\n".join(lines) + proc.stderr[-2000:]
    assert names == ["graphs[none]", "graphs[local]", "graphs[full_iteration]", "resume[first half]",
                     "resume[second half]", "monitor", "without --no-rope-fusion", "without --no-persist-layer-norm",
                     "without --no-gradient-accumulation-fusion", "without --no-masked-softmax-fusion", "imports", "loop"]
    loop = lines[-1]
    assert "helper build skipped: True" in loop and "losses {1: " in loop


def test_kernel_item_passes_a_kernel_that_contracts_to_fma(monkeypatch):
    """The kernel item against an emulated FMA kernel (Triton's contraction on CUDA): it must pass
    and count the elements that only the FMA rounding explains; a kernel one step off must fail."""
    import torch

    from prores_megatron.core import scaled_bias_dropout_add as sbda

    gc = load_gpu_check()
    real = sbda.get_scaled_bias_dropout_add

    def fma_kernel(x_with_bias, residual, prob, alpha):
        x, bias = x_with_bias
        y = x.float() + (bias.float() if bias is not None else 0.0)
        return gc.fma_fp32(alpha.float().expand_as(y), y, residual.float()).to(residual.dtype)

    monkeypatch.setattr(sbda, "get_scaled_bias_dropout_add",
                        lambda training, fused: fma_kernel if fused else real(training, fused))
    # The item's compile-related parts cost a minute of CPU compile time and are not under test here.
    from prores_megatron.core import compat

    stock = compat.get_bias_dropout_add
    monkeypatch.setattr(compat, "get_bias_dropout_add", lambda training, fused: stock(training, False))
    monkeypatch.setattr(torch, "compile", lambda fn: fn)
    ok, detail = gc.check_kernel()
    assert ok, detail
    fma_only = int(detail.split(" only the FMA rounding")[0].rsplit(" ", 1)[-1])
    assert fma_only > 0, detail

    def off_kernel(x_with_bias, residual, prob, alpha):
        out = fma_kernel(x_with_bias, residual, prob, alpha).clone()
        out.view(-1)[5] = out.view(-1)[5] * 2 + 1
        return out

    monkeypatch.setattr(sbda, "get_scaled_bias_dropout_add",
                        lambda training, fused: off_kernel if fused else real(training, fused))
    ok, detail = gc.check_kernel()
    assert not ok and "1 neither" in detail, detail


def test_prepare_brings_the_megatron_core_wheel_and_checks_the_size(tmp_path):
    """``--prepare`` on this (CPU) machine: the megatron-core wheel for the GPU machine's CPython 3.12
    on x86-64, nothing else, and the size that travels under 64 MiB, with the command to run there."""
    whl = tmp_path / "whl"
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--prepare"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, GPU_CHECK_WHL=str(whl)))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    wheels = sorted(p.name for p in whl.iterdir())
    assert len(wheels) == 1 and wheels[0].startswith("megatron_core-0.19.2-cp312-cp312-") and "x86_64" in wheels[0]
    size_line = next(ln for ln in proc.stdout.splitlines() if "MiB (limit 64 MiB)" in ln)
    total = float(size_line.split(" = ")[1].split(" MiB")[0])
    assert 0 < total < 64
    assert proc.stdout.rstrip().endswith("bash tools/gpu_check.sh")


def test_step_time_reads_what_the_benchmark_prints():
    """The step_time item parses bench_overhead's ratio lines; a tiny bf16 local-spec run on CPU (alpha
    written inside every timed ProRes step) prints both, with intervals around the medians."""
    gc = load_gpu_check()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_overhead.py"), "--layers", "2",
                           "--hidden", "64", "--seq", "32", "--batch", "2", "--steps", "3", "--dtype", "bf16",
                           "--no-fusion"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = {kind: tuple(map(float, v)) for kind, *v in gc.BENCH_RATIO.findall(proc.stdout)}
    assert sorted(found) == ["alpha = 1", "mid-warmup"]
    assert all(lo <= r <= hi for r, lo, hi in found.values())
