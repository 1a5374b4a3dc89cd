"""``prores-megatron heldout``: a run's loss on its held-out documents, with a standard error, and the
activation norm across depth.

Contract: ``--checkpoint SAVE_DIR`` (a Megatron save directory or one ``iter_*`` directory) is loaded
at world size 1 (``model_from_checkpoint``: the run's own model, from its saved arguments) with alpha
at the checkpoint's completed optimizer steps. The text is the run's validation documents: those
Megatron's ``--split`` (the run's, or ``--split``) assigns to the validation set of the run's
single ``--data-path`` prefix (or ``--data-path``), rounded as Megatron rounds them. They are
concatenated and cut into non-overlapping windows of the run's sequence length (at most
``--max-windows``), so every token is scored once. ``--out FILE`` receives (atomically) a JSON
object: ``val_loss`` (mean next-token cross-entropy), ``val_se`` (its standard error from the spread
of the per-window means: windows are the independent units), ``window_losses`` (for paired
differences between runs on the same windows), ``val_windows``/``val_tokens``/``documents``, and per
layer ``resid_norm`` (mean per-token L2 norm of the residual stream after the layer: the paper's
Fig. 3 quantity), ``resid_rms`` and ``alpha`` as the model's buffers held it (``LayerMonitor``).
Refused with a message naming the flag: a blended or mock data path, an empty validation split, a
checkpoint that does not open.
"""

import json
import math
import os
from pathlib import Path

from ..checkpoint import CheckpointError
from .usage import UsageError

INPUT_ERRORS = (CheckpointError,)


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="the run's --save directory, or one iter_* directory")
    p.add_argument("--out", required=True, help="JSON file for the result (written atomically)")
    p.add_argument("--data-path", help="indexed dataset prefix (default: the run's single --data-path)")
    p.add_argument("--split", help="train,valid,test weights (default: the run's --split)")
    p.add_argument("--max-windows", type=int, help="score at most this many windows (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="windows per forward pass (default: %(default)s)")


def validation_documents(num_documents: int, split: str):
    """(lo, hi): the validation documents of ``split``, as Megatron's dataset builder rounds them."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    try:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except (AssertionError, ValueError) as err:
        raise UsageError(f"--split {split!r}: not a train,valid,test weight list ({err})") from None
    if matrix[1] is None:
        raise UsageError(f"--split {split!r}: the validation weight is 0, so the run has no held-out documents")
    lo, hi = (int(round(x * float(num_documents))) for x in matrix[1])
    if hi <= lo:
        raise UsageError(f"--split {split!r}: no validation document among {num_documents}")
    return lo, hi


def validation_windows(prefix: str, split: str, seq_length: int, max_windows=None):
    """[n, seq_length + 1] int64 windows of the validation documents, and (lo, hi)."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not Path(prefix + ".idx").is_file() or not Path(prefix + ".bin").is_file():
        raise UsageError(f"--data-path {prefix}: no {prefix}.idx / .bin (a Megatron indexed dataset prefix)")
    dataset = IndexedDataset(prefix)
    lo, hi = validation_documents(len(dataset), split)
    tokens = np.concatenate([np.asarray(dataset[i], dtype=np.int64) for i in range(lo, hi)])
    n = (len(tokens) - 1) // seq_length
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 2:
        raise UsageError(f"--data-path {prefix}: the validation documents {lo}..{hi - 1} hold fewer than two "
                         f"windows of {seq_length + 1} tokens")
    # Window k predicts tokens k*s+1 .. (k+1)*s from tokens k*s .. (k+1)*s-1: each scored once.
    idx = np.arange(n)[:, None] * seq_length + np.arange(seq_length + 1)[None, :]
    return torch.from_numpy(tokens[idx]), (lo, hi)


def _data_settings(args, saved):
    prefix = args.data_path
    if prefix is None:
        paths = list(getattr(saved, "data_path", None) or [])
        if getattr(saved, "mock_data", False) or len(paths) != 1:
            raise UsageError(f"the run trained on {'mock data' if getattr(saved, 'mock_data', False) else paths!r}: "
                             "give the held-out text's indexed dataset prefix with --data-path")
        prefix = paths[0]
    split = args.split or getattr(saved, "split", None)
    if not split:
        raise UsageError("the run has no --split: give --split (e.g. 90,10,0)")
    return prefix, split


def evaluate(checkpoint, windows, batch_size: int) -> dict:
    """Loss per window and the layer monitor's per-layer statistics of one opened checkpoint."""
    import torch

    from ..core.schedules import prores_step
    from ..core.stepping import set_prores_step
    from ..monitoring.layer_stats import LayerMonitor, summarize
    from .model_from_checkpoint import build_model, init_world1, load_weights

    saved = checkpoint.args
    device = "cuda" if torch.cuda.is_available() else "cpu"
    init_world1(device)
    model = build_model(saved, device)
    load_weights(model, checkpoint.directory)
    # alpha after `iteration` completed optimizer steps, counted from the run's --prores-start-step
    set_prores_step(model, prores_step(checkpoint.iteration, int(getattr(saved, "prores_start_step", 0) or 0)))
    monitor = LayerMonitor(model)
    monitor.start(in_eval=True)
    losses = []
    positions = torch.arange(windows.shape[1] - 1, device=device).unsqueeze(0)
    with torch.no_grad():
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            tokens, labels = batch[:, :-1], batch[:, 1:]
            logits = model(tokens, positions.expand_as(tokens), None).float()
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   reduction="none").view(labels.shape)
            losses.append(ce.mean(dim=1).double().cpu())
    monitor.stop()
    stats = summarize(monitor.reduce(saved.num_layers))
    return torch.cat(losses).numpy(), stats


def run(args) -> int:
    from ..checkpoint import open_checkpoint

    if args.max_windows is not None and args.max_windows < 2:
        raise UsageError(f"--max-windows {args.max_windows}: must be at least 2")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the directory {out.parent} does not exist")
    ckpt = open_checkpoint(args.checkpoint)
    prefix, split = _data_settings(args, ckpt.args)
    windows, (lo, hi) = validation_windows(prefix, split, ckpt.args.seq_length, args.max_windows)
    window_losses, stats = evaluate(ckpt, windows, args.batch_size)
    n = len(window_losses)
    result = {
        "checkpoint": str(ckpt.directory), "iteration": ckpt.iteration, "data_path": prefix, "split": split,
        "documents": [lo, hi], "val_loss": float(window_losses.mean()),
        "val_se": float(window_losses.std(ddof=1) / math.sqrt(n)), "val_windows": n,
        "val_tokens": n * (windows.shape[1] - 1), "window_losses": [float(x) for x in window_losses],
        "resid_norm": stats["resid_norm"], "resid_rms": stats["resid_rms"], "alpha": stats["alpha"],
    }
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)
    print(f"{ckpt.directory}: held-out loss {result['val_loss']:.4f} ± {result['val_se']:.4f} (standard error; "
          f"{result['val_tokens']:,} tokens of validation documents {lo}..{hi - 1}) -> {out}", flush=True)
    return 0
