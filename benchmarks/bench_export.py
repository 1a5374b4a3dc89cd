#!/usr/bin/env python3
"""Benchmark of the HF export on a deep, narrow model: peak memory and throughput (not a test).

Contract: trains (through the real Megatron-LM loop, ``examples/scripts/pretrain_tiny_cpu.sh``,
world size 1, 3 steps) a ``--layers``-deep model of width ``--hidden`` in torch_dist and in the legacy
torch format, or takes ``--checkpoint`` instead, then for each checkpoint prints

- peak memory of the export: the resident-set high-water mark during ``export_to_hf`` above the
  resident set just before it (in a fresh process, after its imports, the mark reset through
  /proc/self/clear_refs), against the largest single layer, the embedding and the whole model,
  and the mark after the first tenth of the layers (no growth with depth: the ratio stays ~1),
  and the peak of a second export in the same process (the one-off allocator growth excluded);
- throughput: export wall time (imports excluded) against a plain sequential read (16 MiB blocks) of every file of
  the checkpoint, both with a warm page cache, so the ratio is the export's overhead over I/O;
- the thread count: the export as shipped (its own ``threads=1`` for the copy loop, in a process
  whose environment sets no thread count) against the same export on torch's default threads (one
  per core), interleaved repeat by repeat.

Run: ``$PRORES_PY benchmarks/bench_export.py [--layers 96] [--hidden 256] [--workdir DIR]``.
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MiB = 2**20


def status_kib():
    text = Path("/proc/self/status").read_text()
    return {k: int(v) for k, v in re.findall(r"(VmHWM|VmRSS):\s+(\d+) kB", text)}


def _one_export(export_to_hf, checkpoint, output, threads):
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status_kib()["VmRSS"]
    marks = []  # high-water mark after each layer: flat after the first few = independent of depth

    def log(message):
        if message.startswith("layer "):
            marks.append((status_kib()["VmHWM"] - before) * 1024)

    t0 = time.perf_counter()
    summary = export_to_hf(checkpoint, output, log=log, threads=threads)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_delta_bytes": (status_kib()["VmHWM"] - before) * 1024,
            "peak_at_tenth_bytes": marks[max(0, len(marks) // 10 - 1)], "written_bytes": summary["total_bytes"]}


def measure(checkpoint, output, threads):
    """Child process: a first export (cold allocator), then a second one in the same process.
    ``threads``: "shipped" (the command's default) or "default" (torch's own, one per core)."""
    # Everything the export imports is imported before the baseline: the numbers are its data.
    import torch  # noqa: F401
    from megatron.core.safe_globals import register_safe_globals  # noqa: F401
    from transformers import LlamaConfig  # noqa: F401

    from prores_megatron.export.exporter import export_to_hf

    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as err:
        sys.exit(f"cannot reset the memory high-water mark ({err}); Linux /proc is needed")
    n = 1 if threads == "shipped" else torch.get_num_threads()
    first = _one_export(export_to_hf, checkpoint, output, n)
    second = _one_export(export_to_hf, checkpoint, output + ".again", n)
    first["warm_peak_delta_bytes"] = second["peak_delta_bytes"]
    first["seconds"] = min(first["seconds"], second["seconds"])
    print(json.dumps(first))


def sequential_read(directory):
    total, t0 = 0, time.perf_counter()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        with open(path, "rb", buffering=0) as f:
            while block := f.read(16 * MiB):
                total += len(block)
    return total, time.perf_counter() - t0


def model_sizes(checkpoint):
    """Bytes of the largest layer, the embedding(s) and the whole model, as stored."""
    from prores_megatron.checkpoint import open_checkpoint

    ckpt = open_checkpoint(checkpoint)
    per_layer, other, L = 0, 0, None
    for name, (shape, dtype) in ckpt.shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if name.startswith("decoder.layers."):
            L = shape[0]
            per_layer += nbytes // shape[0]  # homogeneous layers: every layer is the largest
        elif "word_embeddings" in name or "output_layer" in name:
            other += nbytes
    return {"layers": L, "layer": per_layer, "embeddings": other, "model": per_layer * L + other}


def train(workdir, layers, hidden, fmt):
    save = workdir / f"ckpt_{fmt}"
    if (save / "latest_checkpointed_iteration.txt").exists():
        return save
    heads = max(1, hidden // 64)
    env = dict(os.environ, PYTHON=sys.executable, TP="1", PP="1", TRAIN_ITERS="3", SAVE_DIR=str(save),
               EXTRA_ARGS=f"--num-layers {layers} --hidden-size {hidden} --ffn-hidden-size {hidden * 11 // 4} "
               f"--num-attention-heads {heads} --num-query-groups {heads} --save-interval 3 --lr-warmup-iters 1 --eval-interval 1000 "
               f"--eval-iters 1 --log-interval 1 --tensorboard-dir {workdir / 'tb'} --ckpt-format {fmt}",
               PRORES_ARGS="--prores-schedule linear --prores-warmup-steps 0.05")
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "examples/scripts/pretrain_tiny_cpu.sh")], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"training failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    print(f"trained {layers} layers x {hidden} ({fmt}) in {time.perf_counter() - t0:.0f} s")
    return save


def bench(checkpoint, workdir, repeats):
    from prores_megatron.checkpoint import resolve_iteration_dir

    it_dir = resolve_iteration_dir(checkpoint)
    sizes = model_sizes(it_dir)
    sequential_read(it_dir)  # warm the page cache for both measurements
    # The minimum over repeats: the machine may be shared, and contention only ever adds time.
    read_bytes, read_s = min((sequential_read(it_dir) for _ in range(repeats * 2)), key=lambda r: r[1])
    runs, default_threads = [], []
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    for k in range(repeats):
        for threads in ("shipped", "default"):
            out = Path(tempfile.mkdtemp(dir=workdir)) / "hf"
            proc = subprocess.run([sys.executable, __file__, "--measure", str(it_dir), str(out), threads],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"export failed:\n{proc.stderr[-3000:]}")
            (runs if threads == "shipped" else default_threads).append(json.loads(proc.stdout.strip().splitlines()[-1]))
            shutil.rmtree(out.parent)
    best = min(runs, key=lambda r: r["seconds"])
    best_default = min(r["seconds"] for r in default_threads)
    peak = max(r["peak_delta_bytes"] for r in runs)
    tenth = max(r["peak_at_tenth_bytes"] for r in runs)
    warm = max(r["warm_peak_delta_bytes"] for r in runs)
    print(f"\n{it_dir} ({sizes['layers']} layers)")
    print(f"  sizes as stored: largest layer {sizes['layer'] / MiB:.2f} MiB, embeddings {sizes['embeddings'] / MiB:.2f} MiB, "
          f"model {sizes['model'] / MiB:.1f} MiB, all files {read_bytes / MiB:.1f} MiB")
    print(f"  export peak memory above baseline: {peak / MiB:.1f} MiB")
    print(f"    / largest layer            = {peak / sizes['layer']:.2f}")
    print(f"    / (largest layer + embeds) = {peak / (sizes['layer'] + sizes['embeddings']):.2f}")
    print(f"    / whole model              = {peak / sizes['model']:.3f}")
    print(f"    after the first {sizes['layers'] // 10} layers it was {tenth / MiB:.1f} MiB: "
          f"end / first-tenth = {peak / max(tenth, 1):.2f} (1 = no growth with depth)")
    print(f"  a second export in the same process (allocator already grown): {warm / MiB:.1f} MiB "
          f"= {warm / sizes['layer']:.2f} x largest layer")
    print(f"  plain sequential read of all files: {read_s:.2f} s ({read_bytes / MiB / read_s:.0f} MiB/s)")
    print(f"  export (read model tensors, fold, bf16, write {best['written_bytes'] / MiB:.0f} MiB): {best['seconds']:.2f} s "
          f"({sizes['model'] / MiB / best['seconds']:.0f} MiB/s of model)")
    print(f"    export time / sequential read time = {best['seconds'] / read_s:.2f}")
    print(f"  torch's default threads ({os.cpu_count()} cores): {best_default:.2f} s = "
          f"{best_default / best['seconds']:.2f} x the shipped single-thread copy loop")


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--measure":
        return measure(sys.argv[2], sys.argv[3], sys.argv[4])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=96)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--workdir", help="where checkpoints are trained and kept (default: a temporary dir)")
    p.add_argument("--checkpoint", help="benchmark this checkpoint instead of training two")
    p.add_argument("--repeats", type=int, default=3, help="export processes per checkpoint (the fastest counts)")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="prores_bench_export_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        bench(args.checkpoint, workdir, args.repeats)
        return
    for fmt in ("torch_dist", "torch"):
        bench(train(workdir, args.layers, args.hidden, fmt), workdir, args.repeats)


if __name__ == "__main__":
    main()
