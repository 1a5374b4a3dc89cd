"""Unpickling checkpoint files without running code from them.

Contract:
- ``load_dcp_metadata(path)``: the ``torch.distributed.checkpoint.metadata.Metadata`` of a torch_dist
  ``.metadata`` file, unpickled by ``RestrictedUnpickler``; problems raise ``CheckpointError``
  naming the file.
- ``RestrictedUnpickler(file, what)``: a ``pickle.Unpickler`` that resolves only the globals in
  ``DCP_METADATA_GLOBALS`` (explicit ``(module, name)`` pairs: DCP's metadata dataclasses, torch.Size,
  the torch dtypes and layouts). Any other global, and any persistent id, raises ``UnsafePickleError``
  naming ``module.name`` and ``what`` before that global is imported, looked up or called; a pickle
  that sets attributes on an allowed class or function (BUILD on a global) is refused too, and the
  attributes are put back.
- ``restricted_dcp_loading(what)``: a context manager under which megatron-core's own loader
  (``dist_checkpointing.load``, ``load_content_metadata``, ...), which would unpickle ``.metadata``
  with plain ``pickle.load`` and pickled entries with ``weights_only=False``, is held to the same
  rules: DCP's ``FileSystemReader.read_metadata`` goes through the restricted unpickler and every
  ``torch.load`` is weights-only (megatron-core's allow-list registered), process-wide while it
  lasts; a refusal inside raises ``UnsafePickleError`` from the block.
Every other pickle in a checkpoint (the common state, TE extra state, legacy rank files) holds
tensors and Megatron's arguments and is loaded by torch's weights-only unpickler
(``base.safe_torch_load``). Version-specific names (torch 2.11, megatron-core 0.19.2) live here.
"""

import contextlib
import os
import pickle
from pathlib import Path

import torch

from .base import CheckpointError, UnsafePickleError, register_megatron_safe_globals, weights_only_refusal

_METADATA = "torch.distributed.checkpoint.metadata"
_FILESYSTEM = "torch.distributed.checkpoint.filesystem"
_PLANNER = "torch.distributed.checkpoint.planner"

# What a torch_dist .metadata may reference. The first group is every global found in the
# .metadata of real megatron-core 0.19.2 / torch 2.11 saves (world size 1, TP2, PP2 x VPP2,
# distributed optimizer, cached save structure). Nothing here runs code when called with
# arbitrary arguments: they are passive dataclasses and enums, a tuple subclass and a name lookup.
_SEEN_IN_SAVES = (
    (_METADATA, "Metadata"),
    (_METADATA, "TensorStorageMetadata"),
    (_METADATA, "BytesStorageMetadata"),
    (_METADATA, "ChunkStorageMetadata"),
    (_METADATA, "TensorProperties"),
    (_METADATA, "MetadataIndex"),
    (_METADATA, "StorageMeta"),
    (_METADATA, "_MEM_FORMAT_ENCODING"),  # how TensorProperties.__getstate__ stores memory_format
    (_FILESYSTEM, "_StorageInfo"),  # Metadata.storage_data values: file, offset, length
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # torch.layout pickles as _get_layout("torch.strided")
)
# Not in those saves, from the source: megatron-core attaches the SavePlans of every rank to the
# Metadata (``all_local_plans``, state_dict_saver.py), and its multi-storage-client writer pickles
# the Metadata as it stands, so they can appear (DCP's own writer copies the dataclass and drops them).
_FROM_SOURCE = (
    (_PLANNER, "SavePlan"),
    (_PLANNER, "WriteItem"),
    (_PLANNER, "WriteItemType"),
    (_PLANNER, "TensorWriteData"),
    (_PLANNER, "BytesIOWriteData"),
    (_FILESYSTEM, "_StoragePrefix"),  # SavePlan.storage_data of DCP's FileSystemWriter
)
# Tensor dtypes (TensorProperties.dtype) pickle as the global torch.<name>; they are values, never called.
_DTYPES = tuple(sorted(("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)))

DCP_METADATA_GLOBALS = frozenset(_SEEN_IN_SAVES + _FROM_SOURCE + _DTYPES)


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` limited to ``DCP_METADATA_GLOBALS`` (see the module docstring)."""

    def __init__(self, file, what, allowed=DCP_METADATA_GLOBALS):
        # fix_imports=False: the (module, name) checked is the one the pickle names, never a
        # Python 2 name remapped after the check.
        super().__init__(file, fix_imports=False)
        self.what = what
        self.allowed = allowed
        self._handed_out = {}  # id -> (global, its name, its attributes when first handed out)

    def find_class(self, module, name):
        # Every global a pickle can call or instantiate passes through here (GLOBAL, STACK_GLOBAL,
        # INST, and EXT codes of copyreg's extension registry, which is empty unless code fills it).
        # The check comes first: a refused module is never imported, a refused name never looked up.
        if (module, name) not in self.allowed:
            raise UnsafePickleError(
                f"{self.what}: refusing to unpickle the global {module}.{name}: checkpoint metadata "
                "may reference only DCP's metadata classes (prores_megatron.checkpoint.safe_unpickle); "
                "the file was not loaded, and nothing outside the allow-list was imported or run"
            )
        obj = super().find_class(module, name)
        if id(obj) not in self._handed_out:
            self._handed_out[id(obj)] = (obj, f"{module}.{name}", _attributes(obj))
        return obj

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.what}: refusing a persistent id in its pickle (DCP metadata has none)")

    def load(self):
        try:
            return super().load()
        finally:
            self._check_globals_untouched()

    def _check_globals_untouched(self):
        # BUILD on a global itself (not on an instance) would set attributes on an allowed class
        # or function for the rest of the process: undo it and refuse the file.
        changed = []
        for obj, label, before in self._handed_out.values():
            if before is None:
                continue
            after = _attributes(obj)
            if after.keys() != before.keys() or any(after[k] is not v for k, v in before.items()):
                changed.append(label)
                for key in after.keys() - before.keys():
                    delattr(obj, key)
                for key, value in before.items():
                    if after.get(key) is not value:
                        setattr(obj, key, value)
        if changed:
            raise UnsafePickleError(
                f"{self.what}: refusing its pickle: it sets attributes of {', '.join(sorted(changed))}"
            )


def _attributes(obj):
    """A shallow copy of ``vars(obj)``, or None for objects without one (dtypes)."""
    try:
        return dict(vars(obj))
    except TypeError:
        return None


def _load_metadata_stream(stream, what):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    try:
        metadata = RestrictedUnpickler(stream, what).load()
    except CheckpointError:
        raise
    except Exception as err:  # truncated pickle, bad opcode, a constructor refusing its arguments
        raise CheckpointError(
            f"{what}: cannot be read ({type(err).__name__}: {err}); the checkpoint is truncated or "
            "not a torch_dist checkpoint"
        ) from None
    # Only allowed types can be in it now, but not necessarily where DCP expects them.
    entries = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if not (isinstance(metadata, Metadata) and isinstance(entries, dict) and isinstance(storage, dict)
            and all(isinstance(md, (TensorStorageMetadata, BytesStorageMetadata)) for md in entries.values())
            and all(isinstance(k, MetadataIndex) and isinstance(v, _StorageInfo) for k, v in storage.items())):
        raise CheckpointError(f"{what}: not DCP checkpoint metadata (its pickle holds a malformed "
                              f"{type(metadata).__name__})")
    return metadata


def load_dcp_metadata(path):
    """The DCP ``Metadata`` pickled in ``path`` (a ``.metadata`` file), through ``RestrictedUnpickler``."""
    path = Path(path)
    try:
        stream = open(path, "rb")
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
    with stream:
        return _load_metadata_stream(stream, str(path))


def _restricted_read_metadata(self, *args, **kwargs):
    # torch 2.11 FileSystemReader.read_metadata, with the restricted unpickler for its pickle.load.
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as stream:
        metadata = _load_metadata_stream(stream, str(path))
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def restricted_dcp_loading(what="the checkpoint being loaded"):
    """Hold megatron-core's and DCP's own loaders to the rules above while the block runs.

    DCP's ``DefaultLoadPlanner.load_bytes`` (megatron-core's planner inherits it) calls
    ``torch.load(weights_only=False)``; torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides even an
    explicit False, so it is set for the block (and its opposite, which torch refuses alongside it,
    lifted). DCP's loader swallows a failing ``read_metadata`` (it falls back to per-rank
    ``__<rank>.metadata`` files, also restricted here), so a refused ``.metadata`` is raised again
    when the block ends, whatever became of it inside; a weights-only refusal, which DCP wraps in
    its ``CheckpointException``, comes out as ``UnsafePickleError`` naming ``what``. Both patches
    are process-wide: not for use while other threads load checkpoints.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    register_megatron_safe_globals()
    refusals = []

    def read_metadata(self, *args, **kwargs):
        try:
            return _restricted_read_metadata(self, *args, **kwargs)
        except UnsafePickleError as err:
            refusals.append(err)
            raise

    saved_env = {key: os.environ.get(key) for key in (_FORCE_WEIGHTS_ONLY, _FORCE_NO_WEIGHTS_ONLY)}
    saved_reader = FileSystemReader.__dict__["read_metadata"]
    FileSystemReader.read_metadata = read_metadata
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    os.environ.pop(_FORCE_NO_WEIGHTS_ONLY, None)
    try:
        yield
    except (Exception, CheckpointException) as err:
        if refusals:
            raise refusals[0] from None
        causes = [exc for exc, _ in err.failures.values()] if isinstance(err, CheckpointException) else [err]
        refused = next((exc for exc in causes if isinstance(exc, pickle.UnpicklingError)), None)
        if refused is not None:
            raise UnsafePickleError(
                f"{what}: refusing to unpickle one of its entries ({weights_only_refusal(refused)})") from None
        raise
    finally:
        FileSystemReader.read_metadata = saved_reader
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if refusals:
        raise refusals[0]
