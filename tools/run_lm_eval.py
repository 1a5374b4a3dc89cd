#!/usr/bin/env python3
"""Zero-shot evaluation of a prores-megatron Hugging Face export with lm-evaluation-harness.

    python tools/run_lm_eval.py HF_DIR [--tasks prores_smoke] [--limit N] [--output results.json]
        [--dtype float32|bfloat16|float16] [--device cpu|cuda|cuda:0] [--batch-size 8]
        [--num-fewshot 0] [--include-path DIR ...] [--log-samples] [--online]

Contract: HF_DIR must be a directory written by ``prores-megatron-convert-to-hf`` (config.json,
prores_export.json, safetensors weights, the tokenizer); anything else exits with status 2 and a
message naming what is missing. It runs ``python -m lm_eval run --model hf --model_args
pretrained=HF_DIR,dtype=DTYPE,prefix_token_id=EOS`` with ``--include_path examples/lm_eval`` (the
offline smoke tasks: ``prores_smoke`` = ``prores_smoke_mc``, ``prores_smoke_lastword``,
``prores_smoke_text``) plus any ``--include-path``, prints the command and lm-eval's table, and
exits with lm-eval's status. ``--output PATH`` (a .json file) receives lm-eval's results JSON;
with ``--log-samples`` the per-document records go to ``PATH_STEM.samples/<task>.jsonl``.
Unless ``--online``, HF_DATASETS_OFFLINE, HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE are set to 1, so
nothing is downloaded: the paper's tasks (piqa, hellaswag, ..., see README "Zero-shot evaluation")
fetch their datasets from the Hugging Face Hub and need ``--online``.
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCAL_TASKS = REPO / "examples" / "lm_eval"
CONVERT_HINT = "write one with: prores-megatron-convert-to-hf CHECKPOINT HF_DIR --tokenizer-model tokenizer.model"


def fail(msg: str):
    print(f"run_lm_eval: {msg}", file=sys.stderr)
    raise SystemExit(2)  # the same status as a usage error from argparse


def check_export(hf_dir: Path) -> dict:
    """Refuse anything that is not a complete prores-megatron export; return its config.json."""
    if not hf_dir.is_dir():
        fail(f"{hf_dir} is not a directory; {CONVERT_HINT}")
    missing = [n for n in ("config.json", "prores_export.json") if not (hf_dir / n).is_file()]
    if not any((hf_dir / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        missing.append("model.safetensors[.index.json]")
    # lm-eval needs a tokenizer from the same directory; the export writes one only when it was
    # given --tokenizer-model, and without it lm-eval would fail later with a Hub lookup.
    if not any((hf_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer.json/tokenizer.model (export with --tokenizer-model)")
    if missing:
        fail(f"{hf_dir} is not a prores-megatron Hugging Face export "
             f"(missing: {', '.join(missing)}); {CONVERT_HINT}")
    try:
        return json.loads((hf_dir / "config.json").read_text())
    except json.JSONDecodeError as e:
        fail(f"{hf_dir}/config.json is not valid JSON ({e})")


def build_command(args, hf_dir: Path, config: dict, output_dir: Path | None) -> list[str]:
    model_args = f"pretrained={hf_dir},dtype={args.dtype}"
    eos = config.get("eos_token_id")
    if isinstance(eos, int):
        # Megatron data (--append-eod, no BOS) puts </s> before every document and never <s>, so
        # an empty context (rolling perplexity, first window) is conditioned on </s>, as in training.
        # lm-eval's default would be <s>, whose embedding such a model never trained.
        model_args += f",prefix_token_id={eos}"
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", model_args,
           "--tasks", args.tasks, "--num_fewshot", str(args.num_fewshot),
           "--batch_size", str(args.batch_size), "--device", args.device]
    for inc in [str(LOCAL_TASKS), *args.include_path]:
        cmd += ["--include_path", inc]
    if args.limit is not None:
        cmd += ["--limit", args.limit]
    if output_dir is not None:
        cmd += ["--output_path", str(output_dir)]
    if args.log_samples:
        cmd.append("--log_samples")
    return cmd


def collect_outputs(stage: Path, output: Path, log_samples: bool) -> None:
    """lm-eval names its files <dir>/<model>/results_<timestamp>.json; give them stable names."""
    results = sorted(stage.rglob("results_*.json"))
    if len(results) != 1:
        print(f"run_lm_eval: expected one results file from lm-eval under {stage}, found {len(results)}",
              file=sys.stderr)
        raise SystemExit(1)
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(results[0]), output)
    if log_samples:
        samples_dir = output.with_name(output.stem + ".samples")
        shutil.rmtree(samples_dir, ignore_errors=True)
        samples_dir.mkdir()
        for f in stage.rglob("samples_*.jsonl"):
            task = f.name[len("samples_"):].rsplit("_", 1)[0]  # samples_<task>_<timestamp>.jsonl
            shutil.move(str(f), samples_dir / f"{task}.jsonl")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("hf_dir", type=Path, help="a prores-megatron-convert-to-hf output directory")
    p.add_argument("--tasks", default="prores_smoke",
                   help="comma-separated lm-eval tasks/groups/tags (default: the offline smoke tasks)")
    p.add_argument("--limit", help="documents per task (integer) or fraction (float); default all")
    p.add_argument("--output", type=Path, help="write lm-eval's results JSON here (a .json path)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", default="8", help="integer or 'auto' (GPU)")
    p.add_argument("--num-fewshot", type=int, default=0, help="default 0: the paper's numbers are zero-shot")
    p.add_argument("--include-path", action="append", default=[], help="more lm-eval task folders")
    p.add_argument("--log-samples", action="store_true", help="also keep per-document records (needs --output)")
    p.add_argument("--online", action="store_true",
                   help="allow dataset downloads from the Hugging Face Hub (the paper's tasks need it)")
    args = p.parse_args(argv)
    if args.output is not None and args.output.suffix != ".json":
        p.error(f"--output {args.output}: give a .json file path")
    if args.log_samples and args.output is None:
        p.error("--log-samples needs --output (the samples are written next to it)")
    if args.limit is not None:
        try:
            ok = float(args.limit) > 0
        except ValueError:
            ok = False
        if not ok:
            p.error(f"--limit {args.limit!r}: give a positive integer (documents) or a fraction")
    if args.num_fewshot < 0:
        p.error("--num-fewshot must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    hf_dir = args.hf_dir.resolve()
    config = check_export(hf_dir)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    env = dict(os.environ)
    if not args.online:
        env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    stage = None
    if args.output is not None:
        # lm-eval appends a timestamp to whatever it is given; stage next to the output (same
        # filesystem, so the final move is a rename) and rename afterwards.
        args.output = args.output.resolve()
        args.output.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".lm_eval-", dir=args.output.parent))
    try:
        cmd = build_command(args, hf_dir, config, stage)
        offline = "" if args.online else "HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "
        print(f"run_lm_eval: {offline}{shlex.join(cmd)}", flush=True)
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            hint = ("" if args.online else " If it says a dataset could not be reached on the Hub, "
                    "the task downloads its data: rerun with --online (needs huggingface.co).")
            print(f"run_lm_eval: lm-eval failed with exit status {rc}.{hint}", file=sys.stderr)
            return rc
        if stage is not None:
            collect_outputs(stage, args.output, args.log_samples)
            print(f"run_lm_eval: results in {args.output}", flush=True)
        return 0
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
