"""Legacy ``--ckpt-format torch`` checkpoints: one file per model-parallel rank, merged on the fly.

Contract: ``LegacyTorchCheckpoint(iteration_dir)`` (made by ``checkpoint.reader.open_checkpoint``)
implements ``MegatronCheckpoint`` for ``mp_rank_TT[_PPP]/model_optim_rng.pt`` files. Their layer
numbers are local to each pipeline stage / virtual chunk and their tensors are TP shards; reads
return the global layer and tensor under torch_dist's names: local norms renamed, column-parallel
shards concatenated on dim 0, row-parallel on dim 1, SwiGLU fc1 regrouped from per-rank
``[gate_r; up_r]`` to ``[gate; up]``, replicated tensors taken from rank 0.
"""

import ctypes
import ctypes.util
import mmap
import re
import sys
from pathlib import Path

import torch

from .base import (
    CheckpointError,
    MegatronCheckpoint,
    is_model_tensor_key,
    register_megatron_safe_globals,
    safe_torch_load,
)
from .tensor_names import LAYER_PREFIX, split_gate_up

# Legacy (plain state_dict) names -> torch_dist names. The local spec's separate norms are renamed
# to the TE-fused names in torch_dist (docs/megatron.md §7); LNS wraps the norm in ``.norm``.
_LEGACY_RENAMES = (
    ("input_layernorm.norm.", "self_attention.linear_qkv.layer_norm_"),
    ("pre_mlp_layernorm.norm.", "mlp.linear_fc1.layer_norm_"),
    ("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
    ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"),
)
# How a legacy TP shard maps onto the global tensor: concatenated on dim 0 (column-parallel),
# on dim 1 (row-parallel), gate/up halves of each shard regrouped (SwiGLU fc1), or replicated.
_COLUMN = ("embedding.word_embeddings.weight", "output_layer.weight",
           "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_GATED = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def _release_pages(tensor, bounds):
    """Drop the resident pages of a memory-mapped tensor once it has been copied out.

    The files are mapped private and never written, so the kernel re-reads a page from the file if
    it is touched again: releasing a neighbour's pages is harmless. The range is widened by
    ``_FAULT_MARGIN`` because a page fault maps a whole aligned window around it ("fault-around",
    64 KiB by default), i.e. also the tail of the tensor read before; it is clamped to ``bounds``,
    the span of this file's tensors, so it never touches memory outside the file's mapping.
    Without this every layer already exported would stay resident (file-backed) until the end.
    Linux/glibc only; elsewhere the pages are left to the OS.
    """
    if _LIBC is None:
        return
    storage = tensor.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    if size == 0:
        return
    page = mmap.PAGESIZE
    lo = max(start - _FAULT_MARGIN, bounds[0])
    hi = min(start + size + _FAULT_MARGIN, bounds[1])
    lo -= lo % page  # the mapping starts at file offset 0: rounding down stays inside it
    hi += -hi % page  # ... and ends at the file's last page
    _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def _tensor_span(obj):
    """(lowest, highest) address of the tensors in a (nested) mmap-loaded state dict."""
    lo, hi = None, None
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            a, b = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
            if storage.nbytes():
                lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return lo, hi


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


_MADV_DONTNEED = 4  # <sys/mman.h> on Linux
_FAULT_MARGIN = 1 << 20
_LIBC = _load_libc()


class LegacyTorchCheckpoint(MegatronCheckpoint):
    """``mp_rank_TT[_PPP]/model_optim_rng.pt`` per model-parallel rank: local layer numbers, TP shards.

    Each file is memory-mapped once (``torch.load(mmap=True)``, private mapping): opening it parses
    only its pickle, a read touches just the pages of the tensors it copies out, and those pages are
    released right after the copy, so resident memory stays at about one layer whatever the depth.
    """

    format = "torch"

    def __init__(self, it_dir: Path, saved_args=None):
        self.directory = it_dir
        register_megatron_safe_globals()
        files = {}
        for sub in sorted(it_dir.glob("mp_rank_*")):
            match = _RANK_DIR.match(sub.name)
            if not match:
                raise CheckpointError(f"{sub}: unexpected rank directory name")
            if match.group(3) is not None:
                raise CheckpointError(f"{sub}: expert-parallel checkpoints (MoE) have no Llama equivalent")
            files[(int(match.group(1)), int(match.group(2) or 0))] = sub / "model_optim_rng.pt"
        first = files.get((0, 0))
        if first is None:
            raise CheckpointError(f"{it_dir}: no mp_rank_00 or mp_rank_00_000 directory")
        self._states = {(0, 0): self._open(first)}  # every file stays mapped; see the class docstring
        self._finish_common(self._states[(0, 0)], str(first), saved_args)
        tp = int(getattr(self.args, "tensor_model_parallel_size", 1) or 1)
        pp = int(getattr(self.args, "pipeline_model_parallel_size", 1) or 1)
        self.tp, self.pp = tp, pp
        expected = {(t, p) for t in range(tp) for p in range(pp)}
        pp_named = any(m.group(2) for m in (_RANK_DIR.match(f.parent.name) for f in files.values()))
        if set(files) != expected or (pp > 1) != pp_named:
            want = ", ".join(_rank_dir_name(t, p, pp) for t, p in sorted(expected))
            raise CheckpointError(
                f"{it_dir}: the saved arguments say TP={tp}, PP={pp}, so the rank directories "
                f"must be exactly {want}; found {', '.join(sorted(f.parent.name for f in files.values()))}"
            )
        for f in files.values():
            if not f.is_file():
                raise CheckpointError(f"{f}: missing")
        self._files = files
        self._index_layout()

    def _open(self, file):
        with torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE):  # never write through
            return safe_torch_load(str(file), str(file), mmap=True)

    @staticmethod
    def _chunks(state, file):
        names = sorted((k for k in state if re.fullmatch(r"model\d*", k)), key=lambda k: int(k[5:] or 0))
        if not names:
            raise CheckpointError(f"{file}: no 'model' state dict (a legacy checkpoint without weights)")
        return names

    def _index_layout(self):
        """Global layer order is chunk-major: virtual stage 0 of every pipeline rank, then stage 1,
        ... (true for plain, uneven, interleaved and explicit-layout pipelines alike), so each
        chunk's first global layer is the count of layers in the chunks before it."""
        per_chunk = {}  # (vp, pp) -> {local layer numbers}
        other = {}  # name -> (pp, chunk) holding it
        shapes_tp = {}  # ((vp, pp, local) or None, name) -> {tp rank: (shape, dtype)}
        self._chunk_names = {}
        self._spans = {}
        for (t, p), file in sorted(self._files.items()):
            if (t, p) not in self._states:
                self._states[(t, p)] = self._open(file)
            state = self._states[(t, p)]
            self._spans[(t, p)] = _tensor_span(state)
            if int(state.get("iteration", -1)) != self.iteration:
                raise CheckpointError(f"{file}: iteration {state.get('iteration')} differs from the other ranks' {self.iteration}")
            chunks = self._chunks(state, file)
            self._chunk_names[p] = chunks
            for vp, chunk in enumerate(chunks):
                for key, value in state[chunk].items():
                    if not isinstance(value, torch.Tensor) or not is_model_tensor_key(key):
                        continue
                    name = _legacy_name(key)
                    m = re.match(r"decoder\.layers\.(\d+)\.(.*)$", name)
                    if m:
                        local, sub = int(m.group(1)), m.group(2)
                        per_chunk.setdefault((vp, p), set()).add(local)
                        shapes_tp.setdefault(((vp, p, local), sub), {})[t] = (value.shape, value.dtype)
                    else:
                        other.setdefault(name, (p, chunk))
                        shapes_tp.setdefault((None, name), {})[t] = (value.shape, value.dtype)
                        if other[name] != (p, chunk) and name != "output_layer.weight":
                            raise CheckpointError(f"{file}: {key} appears on more than one pipeline stage")
        self._layer_at = []  # global index -> (vp, pp, local)
        for vp, p in sorted(per_chunk):
            locals_ = sorted(per_chunk[(vp, p)])
            if locals_ != list(range(len(locals_))):
                raise CheckpointError(f"{self._files[(0, p)]}: chunk {vp} has layers {locals_}, expected 0..{len(locals_) - 1}")
            self._layer_at += [(vp, p, i) for i in locals_]
        self._other_at = other
        self.shapes = {}
        L = len(self._layer_at)
        layer_shapes = {}
        for (where, name), per_rank in shapes_tp.items():
            if set(per_rank) != set(range(self.tp)):
                raise CheckpointError(f"{self.directory}: {name} is missing on some tensor-parallel ranks")
            shape, dtype = self._merged_shape(name, [per_rank[t] for t in range(self.tp)])
            if where is None:
                self.shapes[name] = (shape, dtype)
            else:
                layer_shapes.setdefault(name, set()).add((tuple(shape), dtype))
        for name, variants in layer_shapes.items():
            if len(variants) != 1:
                raise CheckpointError(f"{self.directory}: layer tensor {name} has different shapes across layers: {sorted(map(str, variants))}")
            (shape, dtype), = variants
            count = sum(1 for (where, n) in shapes_tp if where is not None and n == name)
            if count != L:
                raise CheckpointError(f"{self.directory}: {name} exists in {count} of {L} layers")
            self.shapes[LAYER_PREFIX + name] = (torch.Size((L,) + shape), dtype)

    def _merged_shape(self, name, per_rank):
        shapes = {tuple(s) for s, _ in per_rank}
        dtype = per_rank[0][1]
        if len(shapes) != 1:
            raise CheckpointError(f"{self.directory}: {name} has different shapes on the tensor-parallel ranks: {sorted(shapes)}")
        shape = list(next(iter(shapes)))
        kind = _tp_kind(name)
        if kind in ("column", "gated"):
            shape[0] *= self.tp
        elif kind == "row":
            shape[1] *= self.tp
        return torch.Size(shape), dtype

    def _gather(self, pp, chunk_index, keys_by_name):
        """{name: [tensor per TP rank]} for state-dict keys ``keys_by_name`` of one stage's chunk."""
        out = {name: [None] * self.tp for name in keys_by_name}
        for t in range(self.tp):
            file = self._files[(t, pp)]
            chunk = self._states[(t, pp)][self._chunk_names[pp][chunk_index]]
            for name, candidates in keys_by_name.items():
                key = next((k for k in candidates if k in chunk), None)
                if key is None:
                    raise CheckpointError(f"{file}: {candidates[0]} is missing")
                # A truncated file never gets here: its zip directory (at the end) fails to open.
                out[name][t] = chunk[key].clone()  # out of the mapping, then release its pages
                _release_pages(chunk[key], self._spans[(t, pp)])
        return {name: _merge_tp(name, shards) for name, shards in out.items()}

    def read_layer(self, layer, names):
        vp, pp, local = self._layer_at[layer]
        keys = {}
        for name in names:
            sub = name[len(LAYER_PREFIX):]
            keys[name] = [f"{LAYER_PREFIX}{local}.{k}" for k in _legacy_candidates(sub)]
        return self._gather(pp, vp, keys)

    def read(self, name):
        pp, chunk = self._other_at[name]
        return self._gather(pp, self._chunk_names[pp].index(chunk), {name: [name]})[name]


def _rank_dir_name(t, p, pp):
    return f"mp_rank_{t:02d}_{p:03d}" if pp > 1 else f"mp_rank_{t:02d}"


def _legacy_name(key: str) -> str:
    m = re.match(r"(decoder\.layers\.\d+\.)(.*)$", key)
    if not m:
        return key
    head, sub = m.groups()
    for old, new in _LEGACY_RENAMES:
        if sub.startswith(old):
            return head + new + sub[len(old):]
    return key


def _legacy_candidates(sub: str):
    """Legacy state-dict spellings of torch_dist layer name ``sub`` (TE-fused, local, LNS)."""
    out = [sub]
    for old, new in _LEGACY_RENAMES:
        if sub.startswith(new):
            out.append(old + sub[len(new):])
    return out


def _tp_kind(name: str) -> str:
    if name.endswith(_COLUMN):
        return "column"
    if name.endswith(_ROW):
        return "row"
    if name.endswith(_GATED):
        return "gated"
    return "replicated"


def _merge_tp(name, shards):
    kind = _tp_kind(name)
    if len(shards) == 1 or kind == "replicated":
        return shards[0]
    if kind == "column":
        return torch.cat(shards, dim=0)
    if kind == "row":
        return torch.cat(shards, dim=1)
    # SwiGLU fc1: each rank holds [gate_r; up_r]; the global tensor is [gate; up].
    halves = [split_gate_up(s) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
