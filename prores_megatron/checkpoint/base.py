"""What the two checkpoint readers share: the reader interface, locating an iteration, safe loading.

Contract:
- ``MegatronCheckpoint`` is the interface ``open_checkpoint`` (``checkpoint.reader``) returns:
  ``args`` / ``iteration`` are the saved Megatron arguments and iteration (``args`` is the
  caller's ``saved_args`` instead when given: a checkpoint that stores no Megatron-LM arguments,
  such as a Megatron-Bridge one, whose settings its caller read elsewhere, e.g. ``run_config.yaml``); ``shapes`` maps every
  model tensor to its global shape and dtype under torch_dist's names (``decoder.layers.<name>``
  stacked on a leading layer axis, TP shards merged, padded vocab rows kept), whatever layout
  (TP/PP/VPP) the run used; ``read_layer(i, names)`` returns layer ``i`` (0-based, global) of the
  given layer tensors and ``read(name)`` one non-layer tensor, reading only those bytes (never the
  optimizer state).
- ``resolve_iteration_dir(path)``: the iteration directory of a save directory (through its tracker
  file) or of an iteration directory.
- ``safe_torch_load(source, what)``: ``torch.load`` with ``weights_only=True``, after
  ``register_megatron_safe_globals()`` has added megatron-core's own allow-list of classes
  (arguments, enums); never arbitrary unpickling. DCP's ``.metadata`` (plain pickle) is read by
  ``safe_unpickle.load_dcp_metadata`` instead.
- ``is_model_tensor_key(key)``: model weights only (not optimizer, RNG, rerun state, FP8 extra state).
Problems raise ``CheckpointError`` naming the path; ``UnsafePickleError`` (a ``CheckpointError``)
when a pickle in it references a class outside the allow-list, refused before that class is used.
"""

import pickle
from pathlib import Path

import torch

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(ValueError):
    """The path is not a readable Megatron checkpoint (the message names the file and why)."""


TRUST_HINT = (" If the checkpoint is of trusted origin and wrongly refused, load it without the allow-list: "
              "--prores-trust-checkpoint (Megatron-LM entry point and patch; Megatron-Bridge: "
              "ProResConfig(trust_checkpoint=True))")


class UnsafePickleError(CheckpointError):
    """A pickle in the checkpoint names a class or function outside the allow-list (the message
    names it and the file, and the flag that loads a trusted checkpoint without the allow-list); it
    was refused before that global was imported or called."""

    def __init__(self, message=""):
        super().__init__(message if TRUST_HINT in message else message + TRUST_HINT)


def register_megatron_safe_globals():
    # megatron-core's allow-list (argparse.Namespace, its enums, ...) for weights_only loading.
    try:
        from megatron.core.safe_globals import register_safe_globals
    except ImportError as err:
        raise CheckpointError(
            f"reading Megatron checkpoint arguments needs megatron-core importable ({err})"
        ) from None
    register_safe_globals()


def weights_only_refusal(err) -> str:
    """The line of torch's weights-only ``UnpicklingError`` that names the refused global (the rest
    is torch's generic advice, including to retry with ``weights_only=False``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(err).__name__)


def safe_torch_load(source, what, **kwargs):
    try:
        return torch.load(source, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:  # torch's weights-only unpickler names the global it refused
        raise UnsafePickleError(f"{what}: refusing to unpickle it ({weights_only_refusal(err)})") from None
    except Exception as err:  # truncated zip, bad magic, ...
        raise CheckpointError(f"{what}: cannot be read ({type(err).__name__}: {err})") from None


def resolve_iteration_dir(path) -> Path:
    """The iteration directory for a save directory (via its tracker file) or an iteration dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (give a Megatron save or iteration directory)")
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            it_dir = path / "release"
        elif text.isdigit():
            it_dir = path / f"iter_{int(text):07d}"
        else:
            raise CheckpointError(f"{tracker}: expected an iteration number or 'release', found {text!r}")
        if not it_dir.is_dir():
            raise CheckpointError(f"{tracker} points at {it_dir.name}, which does not exist in {path}")
        return it_dir
    if (path / ".metadata").exists() or any(path.glob("mp_rank_*")):
        return path
    iters = sorted(p.name for p in path.glob("iter_*"))
    hint = f" (it has {', '.join(iters[-3:])}: give one of them)" if iters else ""
    raise CheckpointError(
        f"{path}: not a Megatron checkpoint: no {TRACKER}, no torch_dist '.metadata' and no "
        f"legacy 'mp_rank_*' directories{hint}"
    )


def is_model_tensor_key(key: str) -> bool:
    """Model weights only: not optimizer state, RNG, rerun state or TE's FP8 ``_extra_state``."""
    return not (
        key.startswith(("optimizer.", "rng_state", "rerun_state_machine", "common_state"))
        or "_extra_state" in key
    )


class MegatronCheckpoint:
    """Common interface; see the module docstring."""

    format = None
    directory: Path
    args = None
    iteration = None
    shapes: dict  # name -> (torch.Size, dtype)

    def read_layer(self, layer: int, names):
        raise NotImplementedError

    def read(self, name: str):
        raise NotImplementedError

    def _finish_common(self, common: dict, source: str, saved_args=None):
        if saved_args is not None:  # the caller's (see module docstring); the common state's are ignored
            if not isinstance(common, dict):
                raise CheckpointError(f"{source}: the common state is not a dict; not a Megatron checkpoint")
            self.args = saved_args
        elif not isinstance(common, dict) or "args" not in common or common["args"] is None:
            raise CheckpointError(
                f"{source}: no saved Megatron arguments ('args'); not a Megatron-LM checkpoint (a "
                "Megatron-Bridge checkpoint is exported with python -m prores_megatron.bridge.export)")
        else:
            self.args = common["args"]
        iteration = common.get("iteration", getattr(self.args, "iteration", None))
        if iteration is None:
            raise CheckpointError(f"{source}: no saved 'iteration'")
        self.iteration = int(iteration)
