"""Export a Megatron (ProRes) GPT checkpoint as a Hugging Face Llama directory: exact, streamed, atomic.

Contract: ``export_to_hf(checkpoint, output, dtype=..., tokenizer_model=None, overrides=None,
force=False, max_shard_size="5GB", log=print, saved_args=None) -> dict`` (a summary).
``saved_args``: the model's settings under Megatron-LM's argument names, for a checkpoint that
stores none (Megatron-Bridge; ``checkpoint.reader``); by default the checkpoint's saved ``args``.

1. Preflight, before anything is written: the checkpoint is opened and validated (layout, saved
   arguments, every shard file present and complete; ``checkpoint.reader``), the Llama layout is
   resolved from its saved arguments and the overrides (``llama_layout``), every model tensor's name
   and shape is checked against that layout, the tokenizer model and the output path are checked,
   and the config is validated by ``transformers.LlamaConfig``. Any problem raises ``ExportError``
   (or ``CheckpointError``) naming the flag or file.
2. Everything is written into a temporary directory next to ``output``: ``config.json``,
   ``generation_config.json``, ``model-*.safetensors`` + ``model.safetensors.index.json`` (one
   layer in memory at a time: read, convert, fold ProRes alpha(l, t), round once, append),
   tokenizer files when ``tokenizer_model`` (SentencePiece) is given, and ``prores_export.json``
   (source, iteration, step t, alpha per layer). Progress is logged per layer.
3. The temporary directory is renamed to ``output`` (``utils.atomic_output``): a failure or Ctrl-C leaves
   no partial output, and an existing ``output`` is replaced only with ``force``, and only when it is
   empty or a previous export (``prores_export.json`` and nothing this exporter does not write).
   A killed export's leftover is removed (or named) by the next export into the same place; the
   filesystem must have room for the new export beside the old one before anything is written.

The layer loop runs with ``threads`` torch threads (default 1): it only slices, concatenates and
casts, which one thread does at memory speed, while torch's default (every core) made it 20-60x
slower on a loaded machine (docs/export.md §5).

t defaults to the checkpoint's iteration (the alpha the next training step would use; Megatron's
own eval at that checkpoint used iteration - 1: ``overrides={"step": iteration - 1}``).
"""

import json
import math
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..checkpoint.base import CheckpointError, resolve_iteration_dir
from ..checkpoint.reader import open_checkpoint
from ..checkpoint.tensor_names import EMBEDDING, FINAL_NORM, OUTPUT
from ..utils.atomic_output import OutputPathError, check_free_space, check_output_path, staged_directory
from .llama_layout import ExportError, resolve_layout
from .llama_tensors import convert_layer, norm_gain
from .safetensors_writer import ShardedSafetensorsWriter, parse_size

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
          "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Flags that size each Megatron tensor, for shape-mismatch messages.
_SHAPE_FLAGS = {  # first match wins
    "layer_norm": "--hidden-size",
    "linear_qkv.weight": "--num-attention-heads, --num-query-groups, --kv-channels, --hidden-size",
    "linear_qkv.bias": "--num-attention-heads, --num-query-groups, --kv-channels",
    "linear_proj": "--hidden-size, --num-attention-heads, --kv-channels",
    "linear_fc1": "--ffn-hidden-size, --hidden-size, --swiglu",
    "linear_fc2": "--ffn-hidden-size, --hidden-size",
    "final_layernorm": "--hidden-size",
    "word_embeddings": "--hidden-size and the padded vocabulary (--make-vocab-size-divisible-by, TP)",
    "output_layer": "--hidden-size and the padded vocabulary (--make-vocab-size-divisible-by, TP)",
}
# Text the exported tokenizer must encode exactly like SentencePiece (a conversion sanity check).
_TOKENIZER_PROBES = ("The quick brown fox jumps over the lazy dog.", "ProRes warms up residual branches, layer by layer: 1, 2, 3!",
                     "line one\nline two\ttabbed")

__all__ = ["export_to_hf", "preflight", "ExportError", "CheckpointError", "DTYPES", "EXPORT_MARKER"]

EXPORT_MARKER = "prores_export.json"  # written into every export: what --force may replace
# Everything an export writes (tokenizer files: transformers' save_pretrained of a Llama tokenizer).
_EXPORT_FILES = re.compile(r"^(config\.json|generation_config\.json|prores_export\.json|model(-\d+-of-\d+)?"
                           r"\.safetensors|model\.safetensors\.index\.json|tokenizer(_config)?\.json|"
                           r"tokenizer\.model|special_tokens_map\.json|added_tokens\.json|chat_template\.jinja)$")


def not_a_previous_export(path: Path):
    """None when ``path`` holds a previous export and nothing else; else the reason (for --force)."""
    if not (path / EXPORT_MARKER).is_file():
        return f"is not a previous export of prores-megatron-convert-to-hf (it has no {EXPORT_MARKER})"
    foreign = sorted(p.name for p in path.iterdir() if not _EXPORT_FILES.match(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        return f"holds files an export does not write ({shown})"
    return None


@contextmanager
def _torch_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_tensors(ckpt, layout):
    want = layout.megatron_shapes()
    have = ckpt.shapes
    # With tied embeddings Megatron may still store the last stage's synchronised copy of the
    # embedding as output_layer.weight (pipeline parallelism); HF ties to embed_tokens instead.
    ignorable = {OUTPUT} if layout.tied else set()
    extra = sorted(set(have) - set(want) - ignorable)
    if extra:
        raise ExportError(
            f"{ckpt.directory}: holds tensors a Llama decoder has no place for: {', '.join(extra[:6])}"
            f"{' ...' if len(extra) > 6 else ''}; it is not a plain GPT/Llama decoder (MoE, MTP, "
            "extra norms or biases the saved arguments do not declare)"
        )
    missing = sorted(set(want) - set(have))
    if missing:
        raise ExportError(
            f"{ckpt.directory}: missing {', '.join(missing)}, which the saved arguments require"
        )
    for key, shape in want.items():
        got, dtype = have[key]
        if tuple(got) != tuple(shape):
            flags = next((f for k, f in _SHAPE_FLAGS.items() if k in key), "the model flags")
            raise ExportError(
                f"{ckpt.directory}: {key} has shape {tuple(got)}, but the saved arguments ({flags}) "
                f"imply {tuple(shape)}; the checkpoint and its arguments disagree"
            )
        if dtype not in _WEIGHT_DTYPES:
            raise ExportError(f"{ckpt.directory}: {key} is stored as {dtype}; only fp32/bf16/fp16 weights can be exported")


def _load_sentencepiece(path):
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--tokenizer-model {path}: no such file")
    try:
        import sentencepiece
    except ImportError:
        raise ExportError("--tokenizer-model needs the 'sentencepiece' package (pip install sentencepiece)") from None
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except Exception as err:
        raise ExportError(f"--tokenizer-model {path}: not a SentencePiece model ({err})") from None
    return sp


def _token_ids(sp, layout, args):
    if sp is not None:
        bos, eos = sp.bos_id(), sp.eos_id()
        return (bos if bos >= 0 else None), (eos if eos >= 0 else None)
    if getattr(args, "tokenizer_type", None) == "NullTokenizer":
        eod = getattr(args, "null_tokenizer_eod_id", None)
        return None, (int(eod) if eod is not None else layout.vocab - 1)  # Megatron's default EOD
    return None, None


def _validate_hf_config(config, notes):
    try:
        from transformers import LlamaConfig
    except ImportError:
        notes.append("transformers is not importable here: config.json was not validated")
        return
    try:
        LlamaConfig(**config)
    except Exception as err:
        raise ExportError(f"this transformers version cannot represent the model as a LlamaConfig: {err}") from None


def _write_tokenizer(sp_path, directory, log):
    """tokenizer.model (the SentencePiece file) + transformers' own conversion of it."""
    shutil.copyfile(sp_path, directory / "tokenizer.model")
    try:
        from transformers import LlamaTokenizer

        # Megatron's SentencePiece tokenizers add no BOS/EOS when encoding training data.
        tok = LlamaTokenizer.from_pretrained(str(directory), add_bos_token=False, add_eos_token=False)
        tok.save_pretrained(str(directory))
    except ImportError:
        log("note: transformers is not importable: only tokenizer.model was written")
        return
    return tok


def _check_tokenizer(tok, sp, log):
    bad = [text for text in _TOKENIZER_PROBES if tok(text)["input_ids"] != sp.encode(text)]
    if bad:
        log(f"warning: the Hugging Face tokenizer encodes {len(bad)} of {len(_TOKENIZER_PROBES)} probe "
            f"texts differently from SentencePiece (e.g. {bad[0]!r}); transformers' Llama conversion is "
            "exact for Llama-style models (identity normalisation, byte fallback)")


def preflight(checkpoint, output, dtype="bfloat16", tokenizer_model=None, overrides=None,
              force=False, max_shard_size="5GB", log=None, saved_args=None):
    """Every check, cheapest first, nothing written: returns what the export needs (a dict)."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: valid choices are {', '.join(DTYPES)}")
    try:
        max_shard_bytes = parse_size(max_shard_size)
    except ValueError as err:
        raise ExportError(f"--max-shard-size: {err}") from None
    step = (overrides or {}).get("step")
    if step is not None and (not isinstance(step, int) or step < 0):
        raise ExportError(f"--step {step!r}: must be a whole number of optimizer steps >= 0")
    sp = _load_sentencepiece(tokenizer_model) if tokenizer_model else None
    try:  # before the checkpoint is even opened; refusing to swallow the checkpoint itself
        output = check_output_path(output, force, protected=[resolve_iteration_dir(checkpoint)],
                                   replaceable=not_a_previous_export, log=log)
    except OutputPathError as err:
        raise ExportError(str(err)) from None
    ckpt = open_checkpoint(checkpoint, saved_args)
    layout, notes = resolve_layout(ckpt.args, ckpt.iteration, overrides,
                                   sp_vocab_size=sp.get_piece_size() if sp is not None else None)
    if ckpt.format == "torch" and ckpt.tp > layout.groups:
        raise ExportError(
            f"{ckpt.directory}: a legacy 'torch' checkpoint with TP={ckpt.tp} > {layout.groups} query "
            "groups stores replicated key/value heads per rank; re-save it with --ckpt-format torch_dist"
        )
    _check_tensors(ckpt, layout)
    bos, eos = _token_ids(sp, layout, ckpt.args)
    out_dtype = DTYPES[dtype]
    dtype_name = str(out_dtype).removeprefix("torch.")
    config = layout.hf_config(dtype_name, bos_token_id=bos, eos_token_id=eos)
    _validate_hf_config(config, notes)
    # The weights, the tokenizer (its model and transformers' JSON, a few times the model's size)
    # and 1 MiB of JSON. The old export stays until the new one is complete: both must fit.
    needed = sum(math.prod(shape) for _, shape in layout.hf_tensors()) * out_dtype.itemsize + 2**20
    if sp is not None:
        needed += 4 * Path(tokenizer_model).stat().st_size
    try:
        check_free_space(output, needed, f"export to {output}", error=ExportError)
    except OSError as err:
        raise ExportError(f"export to {output}: cannot read the free space there ({err})") from None
    if sp is None and getattr(ckpt.args, "tokenizer_model", None):
        notes.append(f"the run used tokenizer {ckpt.args.tokenizer_model}; pass --tokenizer-model to include it")
    return dict(ckpt=ckpt, layout=layout, notes=notes, sp=sp, output=output, out_dtype=out_dtype,
                dtype_name=dtype_name, config=config, bos=bos, eos=eos, max_shard_bytes=max_shard_bytes)


def export_to_hf(checkpoint, output, dtype="bfloat16", tokenizer_model=None, overrides=None,
                 force=False, max_shard_size="5GB", log=print, threads=1, saved_args=None):
    """See module docstring."""
    started = time.perf_counter()
    if not isinstance(threads, int) or threads < 1:
        raise ExportError(f"--threads {threads!r}: must be a whole number >= 1")
    pre = preflight(checkpoint, output, dtype, tokenizer_model, overrides, force, max_shard_size, log=log,
                    saved_args=saved_args)
    ckpt, layout, output = pre["ckpt"], pre["layout"], pre["output"]
    log(f"checkpoint {ckpt.directory} ({ckpt.format}, iteration {ckpt.iteration}): {layout.num_layers} "
        f"layers, hidden {layout.hidden}, heads {layout.heads}/{layout.groups} (head_dim {layout.head_dim}), "
        f"ffn {layout.ffn}, vocab {layout.vocab} (padded {layout.padded_vocab}), arch {layout.arch}")
    log(f"ProRes alpha at t={layout.step} folded per layer: " + " ".join(f"{a:.4g}" for a in layout.alphas))
    for note in pre["notes"]:
        log(f"note: {note}")
    provenance = {
        "source": str(ckpt.directory), "format": ckpt.format, "iteration": layout.iteration,
        "step": layout.step, "arch": layout.arch, "schedule": layout.schedule,
        "warmup_steps": layout.warmup_steps, "alpha_per_layer": layout.alphas,
        "norm_scale_per_layer": layout.norm_scales, "layernorm_1p_folded": layout.zero_centered_gamma,
        "dtype": pre["dtype_name"],
    }
    with staged_directory(output, force, replaceable=not_a_previous_export) as tmp, _torch_threads(threads):
        if pre["sp"] is not None:
            tok = _write_tokenizer(tokenizer_model, tmp, log)
            if tok is not None:
                _check_tokenizer(tok, pre["sp"], log)
        (tmp / "config.json").write_text(json.dumps(pre["config"], indent=2) + "\n")
        generation = {"_from_model_config": True, "bos_token_id": pre["bos"], "eos_token_id": pre["eos"]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / EXPORT_MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
        writer = ShardedSafetensorsWriter(tmp, layout.hf_tensors(), pre["out_dtype"], pre["max_shard_bytes"],
                                          metadata={"source": "prores-megatron"})
        try:
            _write_weights(ckpt, layout, writer, log)
            index = writer.close()
        finally:
            writer.abort()  # closes the open shard if writing failed (no-op after close)
    seconds = time.perf_counter() - started
    total = index["metadata"]["total_size"]
    log(f"wrote {output} ({len(writer.shards)} shard(s), {total / 1e6:.1f} MB, {seconds:.1f} s)")
    return {"output": str(output), "iteration": layout.iteration, "step": layout.step, "alphas": layout.alphas,
            "shards": len(writer.shards), "total_bytes": total, "notes": pre["notes"], "seconds": seconds,
            "layout": layout}


def _write_weights(ckpt, layout, writer, log):
    V = layout.vocab
    # Rows past V are Megatron's vocabulary padding (never produced by the tokenizer): dropped.
    writer.write("model.embed_tokens.weight", ckpt.read(EMBEDDING)[:V])
    names = layout.layer_tensor_names()
    t0 = time.perf_counter()
    for i in range(layout.num_layers):
        for name, tensor in convert_layer(layout, i, ckpt.read_layer(i, names)):
            writer.write(name, tensor)
        log(f"layer {i + 1}/{layout.num_layers} written (alpha {layout.alphas[i]:.4g}, "
            f"{time.perf_counter() - t0:.1f} s)")
    writer.write("model.norm.weight", norm_gain(ckpt.read(FINAL_NORM), layout.zero_centered_gamma))
    if not layout.tied:
        writer.write("lm_head.weight", ckpt.read(OUTPUT)[:V])
