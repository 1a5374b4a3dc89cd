"""Read a Megatron GPT checkpoint one layer at a time, on CPU, without a process group.

Contract: ``open_checkpoint(path)`` takes a Megatron save directory (``latest_checkpointed_iteration.txt``
+ ``iter_*``) or one iteration directory, in ``torch_dist`` (the default) or the legacy per-rank
``torch`` format, and returns a ``MegatronCheckpoint`` (``checkpoint.base``).
``open_checkpoint(path, saved_args)`` reads a checkpoint that stores no Megatron-LM arguments
(Megatron-Bridge writes ``run_config.yaml`` instead) with the settings its caller supplies: an
``argparse.Namespace`` under Megatron-LM's argument names (``prores_megatron.bridge.export``
makes one from a Bridge checkpoint's ``run_config.yaml``).

Everything that can be checked without reading tensor data is checked when the checkpoint is
opened: the directory layout, the saved arguments, and that every data file exists and is as long
as the metadata says (a truncated or missing shard is named before any work). Problems raise
``CheckpointError`` naming the path. The two formats live in ``torch_dist`` and ``legacy_torch``.

``complete_iterations(save_dir, note)`` lists a save directory's checkpoints that can be read:
``{iteration: opened checkpoint}``, sorted. An ``iter_*`` directory newer than the tracker
(``latest_checkpointed_iteration.txt``, which Megatron writes only after a save completed) is an
interrupted save and is skipped, as is one that does not open (a missing ``.metadata``, a truncated
shard); ``note(message)`` hears each skip and why. A checkpoint refused for an unsafe pickle is
never skipped: ``UnsafePickleError`` propagates.
"""

import re
from pathlib import Path

from .base import TRACKER, CheckpointError, MegatronCheckpoint, UnsafePickleError, resolve_iteration_dir
from .legacy_torch import LegacyTorchCheckpoint
from .torch_dist import TorchDistCheckpoint


def open_checkpoint(path, saved_args=None) -> MegatronCheckpoint:
    """Open and validate the checkpoint at ``path`` (see module docstring)."""
    it_dir = resolve_iteration_dir(path)
    if (it_dir / ".metadata").exists():
        return TorchDistCheckpoint(it_dir, saved_args)
    if any(it_dir.glob("mp_rank_*")):
        return LegacyTorchCheckpoint(it_dir, saved_args)
    raise CheckpointError(f"{it_dir}: neither a torch_dist ('.metadata') nor a legacy ('mp_rank_*') checkpoint")


def complete_iterations(save_dir, note=print) -> dict:
    """The readable checkpoints of ``save_dir`` (see module docstring)."""
    save_dir = Path(save_dir)
    found = sorted((int(m.group(1)), d) for d in save_dir.iterdir()
                   if d.is_dir() and (m := re.fullmatch(r"iter_(\d+)", d.name)))
    tracker = save_dir / TRACKER
    text = tracker.read_text().strip() if tracker.is_file() else ""
    latest = int(text) if text.isdigit() else None
    out = {}
    for iteration, directory in found:
        if latest is not None and iteration > latest:
            note(f"note: skipping {directory}: newer than {TRACKER} ({latest}), so its save never completed "
                 "(a crash or kill mid-save)")
            continue
        try:
            out[iteration] = open_checkpoint(directory)
        except UnsafePickleError:
            raise
        except CheckpointError as err:
            note(f"note: skipping {directory}: incomplete or unreadable ({err})")
    return out
