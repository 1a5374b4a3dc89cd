"""Pipeline layout: which global decoder layers each pipeline stage and virtual chunk builds.

Contract:
* ``check_pipeline_flags(args)`` takes Megatron-LM's parsed (not yet validated) arguments and raises
  ``PipelineLayoutError`` naming the flags for every layer split that Megatron-LM refuses late, that
  megatron-core crashes on, or that builds the wrong depth (of megatron-core it only uses the
  layout-string parser).
* ``layer_table(config)`` takes the megatron-core ``TransformerConfig`` the run will build with and
  returns one ``Chunk`` per (pipeline rank, virtual stage) with the 1-based global layer numbers it
  holds, computed by megatron-core's own ``get_transformer_layer_offset`` / ``get_num_layers_to_build``
  (what ``TransformerBlock`` calls at build time), with no process group.
* ``check_layer_coverage(table, num_layers)`` raises unless the chunks hold layers 1..L exactly once.
"""

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..core.pipeline_flags import PIPELINE_FLAGS


class PipelineLayoutError(ValueError):
    """A layer split that Megatron-LM would refuse, crash on, or build with the wrong layers."""


@dataclass(frozen=True)
class Chunk:
    pp_rank: int
    vp_stage: int  # 0 without virtual pipelining
    layers: Tuple[int, ...]  # global, 1-based
    embedding: bool  # holds the input embedding (first rank, first chunk)
    loss: bool  # holds the final norm, output layer and loss (last rank, last chunk)


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _layout_stages(layout: str) -> List[str]:
    """The layout's stages as strings of E/t/L/m, expanded by megatron-core's own parser."""
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    try:
        stages = PipelineParallelLayerLayout.parse_str_to_list(layout)
    except AssertionError as err:
        raise PipelineLayoutError(f"--pipeline-model-parallel-layout {layout!r}: {err}") from None
    letter = {"embedding": "E", "decoder": "t", "loss": "L", "mtp": "m"}
    return ["".join(letter[t.name] for t in stage) for stage in stages]


def check_pipeline_flags(args) -> None:
    """Refuse inconsistent pipeline flags with a message naming them (see module docstring)."""
    L, PP = args.num_layers, args.pipeline_model_parallel_size
    layout = args.pipeline_model_parallel_layout
    per_vstage = args.num_layers_per_virtual_pipeline_stage
    vstages = args.num_virtual_stages_per_pipeline_rank
    first, last = args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers
    emb, loss = args.account_for_embedding_in_pipeline_split, args.account_for_loss_in_pipeline_split
    if L is None or L < 1:
        raise PipelineLayoutError(f"--num-layers {L}: give the decoder depth L >= 1")
    if PP < 1:
        raise PipelineLayoutError(f"--pipeline-model-parallel-size {PP} must be >= 1")
    vpp_flags = [name for name, value in (("--num-layers-per-virtual-pipeline-stage", per_vstage),
                                          ("--num-virtual-stages-per-pipeline-rank", vstages),
                                          ("--pipeline-model-parallel-layout", layout)) if value is not None]
    if len(vpp_flags) > 1:
        raise PipelineLayoutError(f"{' and '.join(vpp_flags)} are mutually exclusive: give at most one")
    counts = {"--num-layers-per-virtual-pipeline-stage": per_vstage,
              "--num-virtual-stages-per-pipeline-rank": vstages,
              "--decoder-first-pipeline-num-layers": first,
              "--decoder-last-pipeline-num-layers": last}
    for name, value in counts.items():
        if value is not None and value < 1:
            raise PipelineLayoutError(f"{name} {value} must be >= 1")
    used = [name for name, value in counts.items() if value is not None]
    if PP == 1 and used:
        # At PP=1 a first/last count silently becomes the model depth (Megatron-LM issue #1778).
        raise PipelineLayoutError(f"{', '.join(used)} need --pipeline-model-parallel-size > 1 (it is 1)")

    if layout is not None:
        vpp = _check_layout(args, layout)
    elif first is not None or last is not None:
        vpp = _check_uneven(args)
    else:
        total = L + int(emb) + int(loss)
        extra = "".join(
            f" + 1 ({flag})"
            for flag, on in (("--account-for-embedding-in-pipeline-split", emb),
                             ("--account-for-loss-in-pipeline-split", loss))
            if on
        )
        if total % PP:
            raise PipelineLayoutError(
                f"--num-layers {L}{extra + f' = {total}' if extra else ''} is not divisible by "
                f"--pipeline-model-parallel-size {PP} (divisors of {total}: "
                f"{_divisors(total)}); or set --decoder-first-pipeline-num-layers / "
                "--decoder-last-pipeline-num-layers or --pipeline-model-parallel-layout"
            )
        per_stage = total // PP
        vpp = None
        if per_vstage is not None:
            if per_stage % per_vstage:
                raise PipelineLayoutError(
                    f"each of the {PP} pipeline stages holds {per_stage} layers, not divisible by "
                    f"--num-layers-per-virtual-pipeline-stage {per_vstage} (divisors of "
                    f"{per_stage}: {_divisors(per_stage)})"
                )
            vpp = per_stage // per_vstage
        elif vstages is not None:
            if per_stage % vstages:
                raise PipelineLayoutError(
                    f"each of the {PP} pipeline stages holds {per_stage} layers, not divisible by "
                    f"--num-virtual-stages-per-pipeline-rank {vstages} (divisors of {per_stage}: "
                    f"{_divisors(per_stage)})"
                )
            vpp = vstages
    if vpp is not None and vpp > 1 and PP == 2 and not args.overlap_p2p_comm:
        # Batched p2p at PP=2 sends both directions to the same peer in one batch and swaps
        # activations with gradients (docs/megatron.md §4); Megatron-LM asserts PP > 2 here.
        raise PipelineLayoutError(
            "virtual pipeline stages at --pipeline-model-parallel-size 2 need overlapped p2p "
            "communication: drop --no-overlap-p2p-communication (batched p2p between the same two "
            "ranks mixes up activations and gradients), or use PP > 2"
        )


def _check_layout(args, layout: str) -> int:
    L, PP = args.num_layers, args.pipeline_model_parallel_size
    others = [
        name
        for name, on in (
            ("--decoder-first-pipeline-num-layers", args.decoder_first_pipeline_num_layers is not None),
            ("--decoder-last-pipeline-num-layers", args.decoder_last_pipeline_num_layers is not None),
            ("--account-for-embedding-in-pipeline-split", args.account_for_embedding_in_pipeline_split),
            ("--account-for-loss-in-pipeline-split", args.account_for_loss_in_pipeline_split),
        )
        if on
    ]
    if others:
        raise PipelineLayoutError(
            f"--pipeline-model-parallel-layout places every layer itself; drop {', '.join(others)}"
        )
    stages = _layout_stages(layout)
    if len(stages) % PP:
        raise PipelineLayoutError(
            f"--pipeline-model-parallel-layout {layout!r} has {len(stages)} '|'-separated stages, "
            f"not a multiple of --pipeline-model-parallel-size {PP}"
        )
    flat = "".join(stages)
    if flat.count("t") != L:
        raise PipelineLayoutError(
            f"--pipeline-model-parallel-layout {layout!r} places {flat.count('t')} decoder layers "
            f"('t') but --num-layers is {L}"
        )
    if flat.count("E") != 1 or not flat.startswith("E"):
        raise PipelineLayoutError(
            f"--pipeline-model-parallel-layout {layout!r}: the embedding 'E' must appear exactly "
            "once, first (pipeline rank 0, virtual stage 0)"
        )
    if flat.count("L") != 1 or not flat.endswith("L"):
        raise PipelineLayoutError(
            f"--pipeline-model-parallel-layout {layout!r}: the loss 'L' must appear exactly once, "
            "last (the last pipeline rank's last virtual stage)"
        )
    mtp = args.mtp_num_layers or 0
    if flat.count("m") != mtp:
        raise PipelineLayoutError(
            f"--pipeline-model-parallel-layout {layout!r} places {flat.count('m')} MTP layers ('m') "
            f"but --mtp-num-layers is {args.mtp_num_layers}"
        )
    return len(stages) // PP


def _check_uneven(args) -> Optional[int]:
    L, PP = args.num_layers, args.pipeline_model_parallel_size
    first, last = args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers
    given = [
        (name, n)
        for name, n in (("--decoder-first-pipeline-num-layers", first),
                        ("--decoder-last-pipeline-num-layers", last))
        if n is not None
    ]
    names = " and ".join(name for name, _ in given)
    if args.account_for_embedding_in_pipeline_split or args.account_for_loss_in_pipeline_split:
        raise PipelineLayoutError(
            f"{names} cannot be combined with --account-for-embedding-in-pipeline-split / "
            "--account-for-loss-in-pipeline-split; place the embedding and loss with "
            "--pipeline-model-parallel-layout instead"
        )
    if args.num_layers_per_virtual_pipeline_stage is not None:
        raise PipelineLayoutError(
            f"{names} with virtual stages needs --num-virtual-stages-per-pipeline-rank, not "
            "--num-layers-per-virtual-pipeline-stage"
        )
    vpp = args.num_virtual_stages_per_pipeline_rank
    middle = PP - len(given)
    rest = L - sum(n for _, n in given)
    if rest < 0:
        raise PipelineLayoutError(f"{names} ({'+'.join(str(n) for _, n in given)}) exceed --num-layers {L}")
    if middle == 0:
        if vpp is not None and vpp > 1:
            # get_transformer_layer_offset divides by the number of middle stages (docs/megatron.md §2).
            raise PipelineLayoutError(
                f"{names} at --pipeline-model-parallel-size {PP} leave no middle stage, and "
                "megatron-core crashes (ZeroDivisionError) when that is combined with "
                "--num-virtual-stages-per-pipeline-rank; use --pipeline-model-parallel-layout"
            )
        if rest:
            raise PipelineLayoutError(
                f"{names} set all {PP} pipeline stages but add up to {L - rest}, not "
                f"--num-layers {L}"
            )
        return vpp
    if rest % middle:
        raise PipelineLayoutError(
            f"--num-layers {L} minus {names} leaves {rest} layers for {middle} middle stage(s) of "
            f"--pipeline-model-parallel-size {PP}: not divisible"
        )
    if vpp is not None and vpp > 1:
        for what, n in [*given, ("each middle stage", rest // middle)]:
            if n % vpp:
                raise PipelineLayoutError(
                    f"{what} holds {n} layers, not divisible by "
                    f"--num-virtual-stages-per-pipeline-rank {vpp}"
                )
    return vpp


@contextlib.contextmanager
def _pipeline_rank(pp_rank: int, vpp_size: Optional[int]):
    """Let megatron-core's layout helpers see (pp_rank, vpp_size) without a process group.

    With a --pipeline-model-parallel-layout, get_transformer_layer_offset / get_num_layers_to_build
    drop the pp_rank they are given and ``PipelineParallelLayerLayout`` reads the rank and the
    virtual-pipeline size from ``parallel_state``. These are megatron-core's own setters; the old
    values are put back (the rank override is a module global, hence the private read).
    """
    from megatron.core import parallel_state as ps

    saved_rank = getattr(ps, "_MPU_PIPELINE_MODEL_PARALLEL_RANK")
    saved_vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    ps.set_pipeline_model_parallel_rank(pp_rank)
    ps.set_virtual_pipeline_model_parallel_world_size(vpp_size)
    try:
        yield
    finally:
        ps.set_pipeline_model_parallel_rank(saved_rank)
        ps.set_virtual_pipeline_model_parallel_world_size(saved_vpp)


def layer_table(config) -> List[Chunk]:
    """Chunks in (pp_rank, vp_stage) order, from megatron-core's build-time layer arithmetic."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    PP = config.pipeline_model_parallel_size
    vpp = config.virtual_pipeline_model_parallel_size
    n_chunks = vpp or 1
    table = []
    for pp_rank in range(PP):
        for vp_stage in range(n_chunks):
            stage_arg = vp_stage if vpp is not None else None
            with _pipeline_rank(pp_rank, vpp):
                try:
                    n = get_num_layers_to_build(config, vp_stage=stage_arg, pp_rank=pp_rank)
                    offset = (get_transformer_layer_offset(config, vp_stage=stage_arg, pp_rank=pp_rank)
                              if n else 0)
                except (AssertionError, ZeroDivisionError, ValueError) as err:
                    raise PipelineLayoutError(
                        f"megatron-core cannot place layers on pipeline rank {pp_rank}, virtual "
                        f"stage {vp_stage} ({type(err).__name__}: {err}); check "
                        f"{', '.join(PIPELINE_FLAGS)}"
                    ) from None
            table.append(
                Chunk(
                    pp_rank=pp_rank,
                    vp_stage=vp_stage,
                    layers=tuple(range(offset + 1, offset + n + 1)),
                    embedding=pp_rank == 0 and vp_stage == 0,
                    loss=pp_rank == PP - 1 and vp_stage == n_chunks - 1,
                )
            )
    return table


def check_layer_coverage(table: List[Chunk], num_layers: int) -> None:
    """Raise unless the chunks together hold global layers 1..num_layers, each exactly once."""
    seen = {}
    for chunk in table:
        for layer in chunk.layers:
            seen.setdefault(layer, []).append((chunk.pp_rank, chunk.vp_stage))
    missing = [l for l in range(1, num_layers + 1) if l not in seen]
    twice = {l: where for l, where in seen.items() if len(where) > 1}
    stray = sorted(l for l in seen if not 1 <= l <= num_layers)
    if missing or twice or stray:
        parts = []
        if missing:
            parts.append(f"layers never built: {_ranges(missing)}")
        if twice:
            parts.append("layers built more than once: " + "; ".join(
                f"{l} on (pp, vp) {where}" for l, where in sorted(twice.items())[:5]))
        if stray:
            parts.append(f"layer numbers outside 1..{num_layers}: {_ranges(stray)}")
        raise PipelineLayoutError(
            f"the pipeline split does not build layers 1..{num_layers} exactly once ("
            + "; ".join(parts) + f"); check {', '.join(PIPELINE_FLAGS)}"
        )


def _ranges(numbers) -> str:
    """'1-5, 9, 11-12' for sorted integers."""
    out, numbers = [], sorted(numbers)
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        out.append(str(numbers[i]) if i == j else f"{numbers[i]}-{numbers[j]}")
        i = j + 1
    return ", ".join(out) if out else "none"


def format_layer_table(table: List[Chunk]) -> str:
    """One line per pipeline rank: its chunks' global layers, with embedding and loss marked."""
    by_rank = {}
    for chunk in table:
        by_rank.setdefault(chunk.pp_rank, []).append(chunk)
    lines = []
    for pp_rank, chunks in sorted(by_rank.items()):
        cells = []
        for c in chunks:
            tags = (["embedding"] if c.embedding else []) + (["loss"] if c.loss else [])
            layers = f"layers {_ranges(c.layers)}" if c.layers else "no layers"
            cells.append(
                (f"chunk {c.vp_stage}: " if len(chunks) > 1 else "")
                + f"{layers} ({len(c.layers)})"
                + (f" + {' + '.join(tags)}" if tags else "")
            )
        total = sum(len(c.layers) for c in chunks)
        lines.append(f"  pp rank {pp_rank:>2} [{total:>3} layers]  " + " | ".join(cells))
    return "\n".join(lines)
