"""torch_dist checkpoints (PyTorch DCP + megatron-core metadata), read one layer slice at a time.

Contract: ``TorchDistCheckpoint(iteration_dir)`` (made by ``checkpoint.reader.open_checkpoint``)
implements ``MegatronCheckpoint`` without a process group and without megatron-core's loader:
``.metadata`` is unpickled by the restricted unpickler (``safe_unpickle.load_dcp_metadata``; DCP's
own ``read_metadata`` is a plain ``pickle.load``) and the common state weights-only; DCP's own
``FileSystemReader``, given that metadata, does the file I/O, and the reads are planned here, per call, as the
slices asked for (layer i of each stacked ``decoder.layers.*`` tensor is the chunk at offset
(i, 0, ...) of size (1, ...); DCP's ``create_read_items_for_chunk_list`` maps it onto whatever
TP/PP shards were saved). Only model tensors are ever read. ``planner_helpers`` is semi-private
torch API, hence the pinned torch and the tests that read real checkpoints through it.
"""

import io
import json
from pathlib import Path

import torch

from .base import (
    CheckpointError,
    MegatronCheckpoint,
    is_model_tensor_key,
    register_megatron_safe_globals,
    safe_torch_load,
)
from .safe_unpickle import load_dcp_metadata


class _SliceTargets:
    """The LoadPlanner side of one batched read: tensor reads land in views of preallocated
    outputs (keyed by name and slice offsets), pickled objects are loaded weights-only.

    Only the three methods a StorageReader calls during ``read_data`` are needed: we plan the
    reads ourselves (one layer's slices), so no global planning or flattening happens.
    """

    def __init__(self, targets, source=None):
        self.targets = targets
        self.source = source  # names the file of the pickled objects, in refusals
        self.objects = {}

    def resolve_tensor(self, read_item):
        index = read_item.dest_index
        target = self.targets[(index.fqn, tuple(index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item, tensor):
        pass  # the data was copied straight into the target view

    def load_bytes(self, read_item, value: io.BytesIO):
        self.objects[read_item.dest_index.fqn] = safe_torch_load(value, self.source)


class TorchDistCheckpoint(MegatronCheckpoint):
    """PyTorch DCP + megatron-core metadata, read through DCP's own FileSystemReader."""

    format = "torch_dist"

    def __init__(self, it_dir: Path, saved_args=None):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        self.directory = it_dir
        self._check_backend()
        self._metadata = load_dcp_metadata(it_dir / ".metadata")
        self._reader = FileSystemReader(str(it_dir))
        # What read_metadata would have handed the reader: the storage items' files and offsets.
        self._reader.set_up_storage_reader(self._metadata, is_coordinator=True)
        self._tensors = {}
        common_keys = []
        for key, md in self._metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata) and is_model_tensor_key(key):
                self._tensors[key] = md
            elif isinstance(md, BytesStorageMetadata) and key.startswith("common_state/"):
                common_keys.append(key)
        self.shapes = {k: (torch.Size(md.size), md.properties.dtype) for k, md in self._tensors.items()}
        self._check_files()
        register_megatron_safe_globals()
        self._finish_common(self._load_common(common_keys), str(it_dir), saved_args)

    def _check_backend(self):
        meta = self.directory / "metadata.json"
        if not meta.is_file():
            return  # very old torch_dist checkpoints have none; .metadata decides
        try:
            backend = json.loads(meta.read_text()).get("sharded_backend")
        except ValueError as err:
            raise CheckpointError(f"{meta}: not valid JSON ({err})") from None
        if backend not in (None, "torch_dist"):
            raise CheckpointError(
                f"{meta}: sharded_backend is {backend!r}; this tool reads 'torch_dist' and the "
                "legacy 'torch' format (re-save with --ckpt-format torch_dist)"
            )

    def _check_files(self):
        """Every storage item the metadata lists lies inside its file. Optimizer items too: the
        export never reads them, but a file cut short means the save never completed."""
        needed = {}
        for info in self._metadata.storage_data.values():
            end = info.offset + info.length
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
        for rel, end in sorted(needed.items()):
            file = self.directory / rel
            if not file.is_file():
                raise CheckpointError(f"{file}: missing (listed in {self.directory / '.metadata'})")
            size = file.stat().st_size
            if size < end:
                raise CheckpointError(f"{file}: truncated ({size} bytes, the metadata needs {end})")

    def _load_common(self, common_keys):
        legacy_common = self.directory / "common.pt"
        if legacy_common.is_file():  # older megatron-core kept it in its own file
            return safe_torch_load(str(legacy_common), str(legacy_common))
        if not common_keys:
            raise CheckpointError(
                f"{self.directory}: no common state (neither 'common.pt' nor a 'common_state' "
                "entry): not a Megatron checkpoint"
            )
        from torch.distributed.checkpoint.metadata import MetadataIndex
        from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

        key = sorted(common_keys)[0]
        item = ReadItem(
            type=LoadItemType.BYTE_IO,
            dest_index=MetadataIndex(key),
            dest_offsets=torch.Size((0,)),
            storage_index=MetadataIndex(key),
            storage_offsets=torch.Size((0,)),
            lengths=torch.Size((0,)),
        )
        info = self._metadata.storage_data.get(item.storage_index)
        source = f"{self.directory / info.relative_path if info else self.directory} (common state {key!r})"
        sink = _SliceTargets({}, source)
        try:
            self._reader.read_data(LoadPlan([item]), sink).wait()
        except CheckpointError:  # safe_torch_load's refusal, naming the file
            raise
        except Exception as err:
            raise CheckpointError(
                f"{self.directory}: common state cannot be read ({type(err).__name__}: {err})"
            ) from None
        common = sink.objects[key]
        # megatron-core stores the common dict as a one-element list of objects.
        return common[0] if isinstance(common, (list, tuple)) and len(common) == 1 else common

    def _read_slices(self, requests):
        """requests: [(name, offsets, sizes)] -> tensors, all in one pass over the files."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        items, targets, outputs = [], {}, []
        for name, offsets, sizes in requests:
            md = self._tensors[name]
            out = torch.empty(sizes, dtype=md.properties.dtype)
            targets[(name, tuple(offsets))] = out
            outputs.append(out)
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            items += create_read_items_for_chunk_list(name, md, [chunk])
        try:
            self._reader.read_data(LoadPlan(items), _SliceTargets(targets)).wait()
        except Exception as err:
            names = ", ".join(sorted({r[0] for r in requests}))
            raise CheckpointError(
                f"{self.directory}: reading {names} failed ({type(err).__name__}: {err}); a shard "
                "file is corrupt"
            ) from None
        return outputs

    def read_layer(self, layer, names):
        requests = []
        for name in names:
            size = self.shapes[name][0]
            requests.append((name, (layer,) + (0,) * (len(size) - 1), (1,) + tuple(size[1:])))
        return {name: t[0] for name, t in zip(names, self._read_slices(requests))}

    def read(self, name):
        size = tuple(self.shapes[name][0])
        return self._read_slices([(name, (0,) * len(size), size)])[0]
