"""Read a Megatron GPT checkpoint one layer at a time, on CPU, without a process group.

Contract: ``open_checkpoint(path)`` takes a Megatron save directory (``latest_checkpointed_iteration.txt``
+ ``iter_*``) or one iteration directory, in ``torch_dist`` (the default) or the legacy per-rank
``torch`` format, and returns a ``MegatronCheckpoint`` (``checkpoint.base``).

Everything that can be checked without reading tensor data is checked when the checkpoint is
opened: the directory layout, the saved arguments, and that every data file exists and is as long
as the metadata says (a truncated or missing shard is named before any work). Problems raise
``CheckpointError`` naming the path. The two formats live in ``torch_dist`` and ``legacy_torch``.
"""

from .base import CheckpointError, MegatronCheckpoint, resolve_iteration_dir
from .legacy_torch import LegacyTorchCheckpoint
from .torch_dist import TorchDistCheckpoint


def open_checkpoint(path) -> MegatronCheckpoint:
    """Open and validate the checkpoint at ``path`` (see module docstring)."""
    it_dir = resolve_iteration_dir(path)
    if (it_dir / ".metadata").exists():
        return TorchDistCheckpoint(it_dir)
    if any(it_dir.glob("mp_rank_*")):
        return LegacyTorchCheckpoint(it_dir)
    raise CheckpointError(f"{it_dir}: neither a torch_dist ('.metadata') nor a legacy ('mp_rank_*') checkpoint")
