"""Write safetensors shards tensor by tensor, never holding more than the tensor being written.

Contract: ``ShardedSafetensorsWriter(directory, plan, dtype, max_shard_bytes)`` takes the full
list ``plan = [(name, shape)]`` up front, in the order the tensors will be produced, and cuts it
into shards of at most ``max_shard_bytes`` (a bigger tensor gets a shard of its own). Because
every name, shape and offset is known in advance, each shard's header is written when the shard
is opened and tensor bytes are appended as they come: memory stays at one tensor whatever the
shard size. ``write(name, tensor)`` must follow the plan order; the shape is checked and the
tensor is rounded to ``dtype`` here, once. ``close()`` checks that every planned tensor was
written and writes ``model.safetensors.index.json``.

The file format (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian
header length N, N bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__":
{...}}`` (space-padded so data starts 8-byte aligned), then the raw little-endian tensor bytes.
"""

import json
import math
import struct
from pathlib import Path

import torch

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
INDEX_NAME = "model.safetensors.index.json"


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '100KB' / '123' (bytes) -> bytes (decimal units, as transformers uses)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    s = str(text).strip().upper()
    for unit, mult in units.items():
        if s.endswith(unit):
            number = s[: -len(unit)].strip()
            break
    else:
        number, mult = s, 1
    try:
        value = float(number) * mult
    except ValueError:
        raise ValueError(f"{text!r} is not a size; use e.g. 5GB, 500MB or a number of bytes") from None
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{text!r} must be a positive size")
    return int(value)


class ShardedSafetensorsWriter:
    def __init__(self, directory, plan, dtype, max_shard_bytes: int, metadata=None):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype} is not writable; valid: {', '.join(map(str, _DTYPES))}")
        self.directory = Path(directory)
        self.dtype = dtype
        self.metadata = {"format": "pt", **(metadata or {})}
        itemsize = torch.empty((), dtype=dtype).element_size()
        shards, current, size = [], [], 0
        for name, shape in plan:
            nbytes = math.prod(shape) * itemsize
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = [], 0
            current.append((name, tuple(int(x) for x in shape), nbytes))
            size += nbytes
        if current:
            shards.append(current)
        n = len(shards)
        self.shards = [(f"model-{k + 1:05d}-of-{n:05d}.safetensors", entries) for k, entries in enumerate(shards)]
        self.order = [(k, entry) for k, (_, entries) in enumerate(self.shards) for entry in entries]
        self.position = 0
        self.file = None
        self.file_index = -1
        self.total_size = sum(e[2] for _, e in self.order)

    def _open_shard(self, k):
        if self.file is not None:
            self.file.close()
        filename, entries = self.shards[k]
        header, offset = {}, 0
        for name, shape, nbytes in entries:
            header[name] = {"dtype": _DTYPES[self.dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)
        self.file = open(self.directory / filename, "wb")
        self.file.write(struct.pack("<Q", len(raw)))
        self.file.write(raw)
        self.file_index = k

    def write(self, name, tensor):
        if self.position >= len(self.order):
            raise ValueError(f"{name}: every planned tensor was already written")
        k, (want, shape, nbytes) = self.order[self.position]
        if name != want:
            raise ValueError(f"tensor {name!r} written out of order; expected {want!r}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, planned {shape}")
        if k != self.file_index:
            self._open_shard(k)
        data = tensor.detach().to(self.dtype).contiguous().view(-1)
        # Raw bytes without an extra copy: reinterpret as uint8 (x86/ARM are little-endian).
        self.file.write(memoryview(data.view(torch.uint8).numpy()))
        self.position += 1

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.position != len(self.order):
            missing = self.order[self.position][1][0]
            raise ValueError(f"{len(self.order) - self.position} planned tensors were never written (first: {missing})")
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": {name: filename for filename, entries in self.shards for name, _, _ in entries},
        }
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return index

    def abort(self):
        if self.file is not None:
            self.file.close()
            self.file = None
