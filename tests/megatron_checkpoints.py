"""Real Megatron-LM checkpoints for the checkpoint-reader and export tests, and helpers to edit them.

Two tiny ProRes models are trained through Megatron-LM's real loop
(``prores_megatron.training.pretrain_gpt``) on CPU, each saved in torch_dist and (by an identical
second run) in the legacy torch format:

  A: TP2, GQA 4/2, untied head, biases on every linear, NullTokenizer V=500 padded to 512, rope
     base 5000, Pre-LN
  B: PP2 x VPP2, MHA, tied embeddings, QKV bias only, LNS, SentencePiece V=300 padded to 384,
     Llama-3 rope scaling

Both use linear ProRes with T=2 over 4 layers, saved at iteration 3 (alpha = 1, .75, .5, .375) and 9
(alpha = 1). ``train_all(tmp)`` makes them (the session fixture ``runs`` in conftest.py calls it once).
"""

import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from prores_megatron.utils import free_port

ROOT = Path(__file__).resolve().parents[1]
T, L, ITERS = 2, 4, 9
MID, END = 3, 9
TOL = 1e-4

COMMON_FLAGS = [
    "--num-layers", str(L), "--hidden-size", "64", "--ffn-hidden-size", "172", "--num-attention-heads", "4",
    "--seq-length", "64", "--max-position-embeddings", "64", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--swiglu",
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--init-method-std", "0.02",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(ITERS),
    "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
    "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--clip-grad", "1.0", "--seed", "1234",
    # CPU: gloo, the local spec, no CUDA-only fusions (docs/megatron.md §4)
    "--distributed-backend", "gloo", "--transformer-impl", "local", "--use-cpu-initialization",
    "--no-rope-fusion", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
    "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-masked-softmax-fusion",
    "--mock-data", "--split", "949,50,1", "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1",
    "--save-interval", "3", "--prores-schedule", "linear", "--prores-warmup-steps", str(T),
]
CONFIGS = {
    "A": (2, ["--tensor-model-parallel-size", "2", "--group-query-attention", "--num-query-groups", "2",
              "--untie-embeddings-and-output-weights", "--rotary-base", "5000",
              "--tokenizer-type", "NullTokenizer", "--vocab-size", "500"]),
    "B": (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
              "--disable-bias-linear", "--add-qkv-bias", "--use-rope-scaling", "--prores-arch", "lns",
              "--tokenizer-type", "GPTSentencePieceTokenizer"]),
}
VOCAB = {"A": 500, "B": 300}


def train_sentencepiece(directory: Path) -> Path:
    """A Llama-style SentencePiece model (BPE, identity normalisation, byte fallback), V = 300."""
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = ("alpha beta gamma delta residual warmup layer model token export llama megatron the a of and to in is "
             "deep network train step quick brown fox").split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) + rng.choice(".!?,") for _ in range(3000))
    (directory / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(directory / "corpus.txt"), model_prefix=str(directory / "sp"), vocab_size=300, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, byte_fallback=True, split_digits=True, minloglevel=2,
    )
    return directory / "sp.model"


def train(tmp: Path, name: str, ckpt_format: str, sp_model: Path) -> Path:
    world, flags = CONFIGS[name]
    save = tmp / f"ckpt_{name}_{ckpt_format}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "prores_megatron.training.pretrain_gpt",
           *COMMON_FLAGS, *flags, "--save", str(save), "--ckpt-format", ckpt_format]
    if name == "B":
        cmd += ["--tokenizer-model", str(sp_model)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    (tmp / f"train_{name}_{ckpt_format}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return save


def train_all(tmp: Path) -> dict:
    """Both configurations in both formats (four Megatron-LM runs), and the tokenizer."""
    sp_model = train_sentencepiece(tmp)
    keys = [(name, fmt) for name in CONFIGS for fmt in ("torch_dist", "torch")]
    # Two 2-rank trainings at a time: their ranks wait on each other often enough that side by side
    # they finish sooner than one after the other on 2 cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(train, tmp, *key, sp_model) for key in keys}
        ckpts = {key: futures[key].result() for key in keys}
    return {"tmp": tmp, "sp": sp_model, "ckpt": ckpts}


def it_dir(save: Path, iteration: int) -> Path:
    return save / f"iter_{iteration:07d}"


OVERRIDES = ("vocab_size", "prores_schedule", "prores_warmup_steps", "prores_arch", "step")


def export(src, out, **kw):
    """export_to_hf in this process (fp32 unless told); override names go into ``overrides``."""
    from prores_megatron.export.exporter import export_to_hf

    lines = []
    kw.setdefault("dtype", "float32")
    overrides = {k: kw.pop(k) for k in OVERRIDES if k in kw}
    summary = export_to_hf(src, out, log=lines.append, overrides=overrides, **kw)
    summary["log"] = lines
    return summary


def exported(runs, name, fmt="torch_dist", iteration=MID, dtype="float32"):
    """The export of one trained checkpoint, made once per module and shared by the tests."""
    out = runs["tmp"] / f"hf_{name}_{fmt}_{iteration}_{dtype}"
    if not out.exists():
        export(it_dir(runs["ckpt"][(name, fmt)], iteration), out, dtype=dtype,
               tokenizer_model=runs["sp"] if name == "B" else None)
    return out


def assert_no_output(out: Path):
    assert not out.exists(), f"{out} was created"
    leftovers = [p.name for p in out.parent.glob(f".{out.name}.*")]
    assert not leftovers, leftovers


def refuse(src, out, match, **kw):
    from prores_megatron.checkpoint import CheckpointError
    from prores_megatron.export.exporter import ExportError

    with pytest.raises((ExportError, CheckpointError), match=match):
        export(src, out, **kw)
    assert_no_output(out)


def copy_checkpoint(runs, tmp_path, name, fmt, iteration=MID):
    dst = tmp_path / f"{name}_{fmt}" / f"iter_{iteration:07d}"
    shutil.copytree(it_dir(runs["ckpt"][(name, fmt)], iteration), dst)
    return dst


def edit_metadata(ckpt: Path, edit):
    with open(ckpt / ".metadata", "rb") as f:
        md = pickle.load(f)
    edit(md.state_dict_metadata)
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)


def rewrite_legacy_args(ckpt: Path, change):
    for f in ckpt.glob("mp_rank_*/model_optim_rng.pt"):
        state = torch.load(f, weights_only=False)
        change(state["args"])
        torch.save(state, f)
    return ckpt
