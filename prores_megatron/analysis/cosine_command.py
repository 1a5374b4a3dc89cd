"""``prores-megatron cosine``: layerwise cosine similarity of each checkpoint to the final one.

Contract: from a run's ``--save`` directory (``--checkpoints``; torch_dist ``iter_*`` checkpoints
of any TP/PP layout) and one fixed batch (``--tokens`` file of token ids [batch, seq], or random
tokens from ``--seed``), every selected checkpoint is loaded into the unsplit model
(``model_from_checkpoint``) with alpha set to its iteration (the completed optimizer steps), run forward
once while ``monitor.capture_branch_outputs`` keeps each layer's raw branch outputs, and compared
with the reference checkpoint (default: the latest): per layer l, the mean over tokens of
cos(u_l, u_l_ref) with u_l = A_l + M_l before alpha (docs/method.md §8, paper Fig. 4;
``token_stats``). The same pass gives the activation norm across depth on that batch (mean
per-token L2 norm of each layer's output). Writes to ``--out``: ``cosine.csv``,
``activation_norm.csv``, ``cosine.md`` (both tables, rows = layers), ``cosine.png`` and
``activation_norm_checkpoints.png``.
"""

import csv
import re
import sys
from pathlib import Path

import numpy as np

from ..checkpoint.base import TRACKER, CheckpointError
from ..checkpoint.reader import complete_iterations
from . import plots
from .usage import UsageError

INPUT_ERRORS = (CheckpointError,)
# Saved arguments that must agree between checkpoints for them to be comparable layer by layer.
SAME_MODEL = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "padded_vocab_size", "prores_schedule", "prores_warmup_steps", "prores_arch", "prores_start_step")


def add_arguments(p) -> None:
    p.add_argument("--checkpoints", required=True, metavar="SAVE_DIR",
                   help="the run's --save directory, holding iter_NNNNNNN checkpoints (torch_dist)")
    p.add_argument("--iterations", metavar="I,J,...",
                   help="checkpoint iterations to compare (default: every checkpoint in SAVE_DIR)")
    p.add_argument("--reference", type=int, metavar="ITER",
                   help="the checkpoint every other is compared with (default: the latest)")
    p.add_argument("--out", required=True, help="directory for the tables and PNGs (created)")
    g = p.add_argument_group("the fixed batch")
    g.add_argument("--tokens", metavar="FILE",
                   help="token ids, shape [batch, seq], as .npy or .pt (a held-out batch; default: random tokens)")
    g.add_argument("--batch-size", type=int, default=4, help="random batch: sequences (default: %(default)s)")
    g.add_argument("--seq-length", type=int, help="random batch: tokens per sequence (default: the run's --seq-length)")
    g.add_argument("--seed", type=int, default=1234, help="random batch: seed (default: %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")


def list_checkpoints(save_dir: Path) -> dict:
    """{iteration: opened checkpoint} of the complete checkpoints (``complete_iterations``: an
    interrupted save is skipped with a note on stderr)."""
    if not save_dir.is_dir():
        raise UsageError(f"--checkpoints {save_dir}: no such directory")
    found = complete_iterations(save_dir, note=lambda message: print(message, file=sys.stderr, flush=True))
    if not found:
        hint = " (give the --save directory that holds the iter_* directories)" if re.fullmatch(r"iter_\d+", save_dir.name) else ""
        raise UsageError(f"--checkpoints {save_dir}: no complete iter_* checkpoint directories{hint}")
    return found


def select(found: dict, iterations, reference, save_dir: Path):
    if reference is None:
        tracker = save_dir / TRACKER
        text = tracker.read_text().strip() if tracker.is_file() else ""
        reference = int(text) if text.isdigit() and int(text) in found else max(found)
    if reference not in found:
        raise UsageError(f"--reference {reference}: no complete checkpoint iter_{reference:07d} in {save_dir} "
                         f"(available: {', '.join(map(str, found))})")
    wanted = sorted(found) if not iterations else sorted(_ints(iterations))
    missing = [i for i in wanted if i not in found]
    if missing:
        raise UsageError(f"--iterations: no complete checkpoint for {', '.join(map(str, missing))} in {save_dir} "
                         f"(available: {', '.join(map(str, found))})")
    return sorted(set(wanted) | {reference}), reference


def _ints(text: str):
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--iterations {text!r}: expected comma-separated integers") from None


def _check_same_model(opened: dict, reference: int):
    ref = opened[reference].args
    for it, ckpt in opened.items():
        if ckpt.format != "torch_dist":
            raise UsageError(f"{ckpt.directory}: a legacy --ckpt-format {ckpt.format} checkpoint; cosine reads "
                             "torch_dist checkpoints (Megatron's default format)")
        for name in SAME_MODEL:
            a, b = getattr(ckpt.args, name, None), getattr(ref, name, None)
            if a != b:
                raise UsageError(f"{ckpt.directory}: --{name.replace('_', '-')} {a} differs from the reference "
                                 f"checkpoint's ({b}); the checkpoints are not from one run")


def fixed_batch(args, saved_args):
    import torch

    vocab = getattr(saved_args, "vocab_size", None) or saved_args.padded_vocab_size
    if args.tokens:
        path = Path(args.tokens)
        if not path.is_file():
            raise UsageError(f"--tokens {path}: no such file")
        try:
            data = torch.from_numpy(np.load(path)) if path.suffix == ".npy" else torch.load(path, weights_only=True)
        except Exception as err:
            raise UsageError(f"--tokens {path}: cannot be read as .npy or .pt ({type(err).__name__}: {err})") from None
        if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.dtype.is_floating_point:
            raise UsageError(f"--tokens {path}: expected an integer array of shape [batch, seq]")
        tokens, source = data.long(), f"token ids from {path}"
    else:
        seq = args.seq_length or saved_args.seq_length
        if args.batch_size < 1 or seq < 1:
            raise UsageError(f"--batch-size {args.batch_size} / --seq-length {seq}: must be >= 1")
        gen = torch.Generator().manual_seed(args.seed)
        tokens = torch.randint(0, vocab, (args.batch_size, seq), generator=gen)
        source = (f"random tokens (--seed {args.seed}, {args.batch_size} x {seq}, uniform over {vocab} ids); "
                  "give --tokens for a held-out text batch")
    if tokens.shape[1] > saved_args.max_position_embeddings:
        raise UsageError(f"the batch has {tokens.shape[1]} tokens per sequence, more than the model's "
                         f"--max-position-embeddings {saved_args.max_position_embeddings}")
    if int(tokens.min()) < 0 or int(tokens.max()) >= saved_args.padded_vocab_size:
        raise UsageError(f"token ids must lie in 0..{saved_args.padded_vocab_size - 1} (the model's vocabulary)")
    return tokens, source


def _forward(model, tokens, iteration: int, start_step: int = 0):
    """Raw branch sums u_l (float32, CPU) and per-token output norms of one checkpoint."""
    import torch

    from ..core.schedules import prores_step
    from ..core.stepping import set_prores_step
    from ..monitoring.layer_stats import capture_branch_outputs
    from .token_stats import token_norm

    # alpha after `iteration` completed optimizer steps, counted from the run's --prores-start-step
    set_prores_step(model, prores_step(iteration, start_step))
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    with torch.no_grad(), capture_branch_outputs(model) as cap:
        model(tokens, position_ids, None)
    layers = sorted(cap.branch)
    u = {l: (cap.branch[l]["attn"].float() + cap.branch[l]["mlp"].float()).cpu() for l in layers}
    norms = [token_norm(cap.output[l]) for l in layers]
    return u, norms


def _write_csv(path: Path, iterations, values, num_layers: int):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration"] + [f"layer_{l:03d}" for l in range(1, num_layers + 1)])
        for it, row in zip(iterations, values):
            w.writerow([it] + [repr(float(v)) for v in row])


def _md_table(iterations, values, digits: int):
    lines = ["| layer | " + " | ".join(f"iter {it}" for it in iterations) + " |",
             "|---|" + "---|" * len(iterations)]
    for l in range(values.shape[1]):
        lines.append(f"| {l + 1} | " + " | ".join(f"{values[j, l]:.{digits}f}" for j in range(len(iterations))) + " |")
    lines.append("| mean | " + " | ".join(f"{np.nanmean(values[j]):.{digits}f}" for j in range(len(iterations))) + " |")
    return lines


def run(args) -> int:
    import torch

    save_dir = Path(args.checkpoints)
    found = list_checkpoints(save_dir)
    iterations, reference = select(found, args.iterations, args.reference, save_dir)
    opened = {it: found[it] for it in iterations}
    _check_same_model(opened, reference)
    ref_args = opened[reference].args
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available here")
    tokens, batch_source = fixed_batch(args, ref_args)

    from .model_from_checkpoint import build_model, init_world1, load_weights
    from .token_stats import token_cosine

    init_world1(device, args.seed)
    model = build_model(ref_args, device)
    tokens = tokens.to(device)
    load_weights(model, found[reference].directory)
    start_step = int(getattr(ref_args, "prores_start_step", 0) or 0)
    ref_u, ref_norms = _forward(model, tokens, reference, start_step)
    L = len(ref_u)
    cosine, norms = np.zeros((len(iterations), L)), np.zeros((len(iterations), L))
    for j, it in enumerate(iterations):
        if it == reference:
            u, norms[j] = ref_u, ref_norms
        else:
            load_weights(model, found[it].directory)
            u, norms[j] = _forward(model, tokens, it, start_step)
        cosine[j] = [token_cosine(u[l], ref_u[l]) for l in sorted(ref_u)]
        print(f"iteration {it}: mean cosine to iteration {reference} {np.nanmean(cosine[j]):.4f}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "cosine.csv", iterations, cosine, L)
    _write_csv(out / "activation_norm.csv", iterations, norms, L)
    schedule = getattr(ref_args, "prores_schedule", None) or "none"
    run_label = f"{save_dir} (schedule {schedule}, L = {L})"
    plots.cosine_figure(out / "cosine.png", iterations, cosine, reference,
                        f"Layerwise cosine similarity of branch outputs (A+M, before α) to iteration {reference}\n{run_label}")
    plots.layer_profiles(out / "activation_norm_checkpoints.png", [(run_label, np.asarray(iterations), norms)],
                         "Activation norm against depth at each checkpoint (fixed batch)",
                         "mean per-token L2 norm of the layer output", max_lines=8)
    md = [
        f"# Layerwise cosine similarity to iteration {reference}", "",
        f"Run: `{save_dir}`, schedule {schedule}, L = {L}. Batch: {batch_source}. Each checkpoint runs with α "
        "at its iteration (completed optimizer steps).", "",
        "Per layer l: the mean over tokens of cos(u_l, u_l at the reference) with u_l = A_l + M_l, the raw attention "
        "and MLP branch outputs before α (docs/method.md §8, paper Fig. 4).", "",
        *_md_table(iterations, cosine, 4), "",
        "![cosine](cosine.png)", "",
        "## Activation norm across depth on this batch", "",
        "Mean over tokens of the per-token L2 norm of each layer's output.", "",
        *_md_table(iterations, norms, 3), "",
        "![activation norm](activation_norm_checkpoints.png)", "",
    ]
    (out / "cosine.md").write_text("\n".join(md), encoding="utf-8")
    print(f"cosine: {out / 'cosine.md'}, {out / 'cosine.csv'}, {out / 'cosine.png'}")
    return 0
