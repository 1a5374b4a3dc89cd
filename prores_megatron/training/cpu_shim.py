"""CPU compatibility shim for Megatron-LM's real ``megatron.training.pretrain()`` loop.

Contract
--------
* ``install_cpu_shim()`` lets megatron-core[training] **0.19.2** (torch 2.11) train on a CPU-only
  machine with ``--distributed-backend gloo``.  It returns False and changes nothing when
  ``torch.cuda.is_available()`` is True; otherwise it installs every patch once (later calls are
  no-ops) and returns True.  Call it before ``megatron.training`` is imported; it imports the
  megatron modules it patches itself.
* ``install_cpu_shim(training=False)`` installs only the megatron-core part and never imports
  ``megatron.training`` (core-only loops, tests); a later default call adds the training part.
* No Megatron file is edited.  The patches are: ten ``torch.cuda`` functions, five attributes of
  megatron-core modules and three of megatron.training, one environment default, and one
  process-wide ``TorchFunctionMode`` that keeps "cuda" tensors on the CPU.  Row numbers (#N) refer
  to the table in docs/megatron.md §4 (the real Megatron-LM loop on CPU), which says why each patch
  is needed.
* If a target attribute no longer exists (for example after a Megatron upgrade), install fails
  loudly with a RuntimeError **before anything is patched**.
* Not supported: ``--use-distributed-optimizer`` resume (#16), sequence parallelism,
  Transformer Engine, FP8, CUDA graphs and ``--async-save``.  The mode is entered on the installing
  thread.  Torch function modes are thread-local, so threads that this thread starts later do not
  see it.  Autograd threads do, because they inherit the caller's thread-local state.
"""

import contextlib
import importlib
import os

import torch
from torch.overrides import TorchFunctionMode

from .dataset_helpers import skip_helper_build_if_prebuilt

__all__ = ["install_cpu_shim", "is_cpu_shim_installed"]

_TARGET_VERSION = "0.19.2"
_installed = False  # the megatron-core part (and the mode)
_installed_training = False  # the megatron.training part
_mode = None  # the single process-wide _CudaToCpuMode (kept alive here)
_originals = {}  # "module.attr" -> the object that was replaced


def is_cpu_shim_installed() -> bool:
    return _installed


def _check(module, attr):
    """Raise unless module.attr exists: a missing target means Megatron (or torch) changed under us."""
    if not hasattr(module, attr):
        try:
            from importlib.metadata import version

            found = version("megatron-core")
        except Exception:  # pragma: no cover - metadata missing
            found = "unknown"
        raise RuntimeError(
            f"prores_megatron.training.cpu_shim: cannot patch {module.__name__}.{attr}: the attribute no "
            f"longer exists. The shim targets megatron-core {_TARGET_VERSION} (installed: {found}); "
            f"update prores_megatron/cpu_shim.py for this version."
        )


def _patch(module, attr, new):
    """The only place that patches: checks that the target exists and remembers the original."""
    _check(module, attr)
    _originals[f"{module.__name__}.{attr}"] = getattr(module, attr)
    setattr(module, attr, new)


def _is_cuda_device(dev):
    # An int device means a CUDA ordinal: torch.cuda.current_device() returns 0 (#4).
    if isinstance(dev, bool):
        return False
    if isinstance(dev, int):
        return True
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, torch.device) and dev.type == "cuda"


_T = torch.Tensor
_SPECIAL = {_T.cuda, _T.pin_memory, _T.to, _T.type}  # methods that need more than a device= rewrite


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA device requests to the CPU for every torch call made on this thread.

    It runs on every torch call: the mode machinery alone costs ~1.8 us per call, so the common path
    here is kept to one dict lookup and one set lookup (measured: no extra cost over an empty mode).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs:
            # #5: device="cuda" / "cuda:N" / torch.device("cuda") / an int ordinal becomes the CPU.
            dev = kwargs.get("device")
            if dev is not None and _is_cuda_device(dev):
                kwargs = {**kwargs, "device": "cpu"}
        else:
            kwargs = {}
        if func not in _SPECIAL:
            return func(*args, **kwargs)
        # #13: Tensor.cuda() and .pin_memory() are the identity (CUDA torch on a GPU-less host raises).
        if func is _T.cuda or func is _T.pin_memory:
            return args[0]
        # #13: .to("cuda") / .to(0) / .to(torch.device("cuda"), ...) with a positional device.
        if func is _T.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        out = func(*args, **kwargs)
        # #6 (hack): Megatron compares grad.type() with 'torch.cuda.FloatTensor' (clip_grads,
        # mixed-precision optimizer), so a zero-arg Tensor.type() reports the CUDA name.
        if func is _T.type and len(args) == 1 and not kwargs and "cuda" not in out:
            out = out.replace("torch.", "torch.cuda.", 1)
        return out


class _FakeStream:
    """#8: DDP is built on a side stream and grad sync uses current_stream(); CPU streams do nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass


_CURRENT_STREAM = _FakeStream()


def _cpu_get_rng_state(*args, **kwargs):
    # #9: the "CUDA" generator is the CPU default generator (TP RNG tracker, checkpoint rng state).
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, *args, **kwargs):
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed):
    # Not torch.manual_seed: that one also calls torch.cuda.manual_seed_all.
    torch.default_generator.manual_seed(int(seed))


def _initialize_megatron_no_cuda(*args, allow_no_cuda=True, **kwargs):
    # #1: pretrain() calls initialize_megatron without allow_no_cuda ("Megatron requires CUDA.").
    orig = _originals["megatron.training.training.initialize_megatron"]
    return orig(*args, allow_no_cuda=True, **kwargs)


def _fork_results_queue(mp_mode="fork"):
    # #14: the torch_dist writer's results queue starts a *spawn* Manager, which re-imports the entry
    # script (3.7-6 s on the first save); 'fork' takes 0.45 s. Keeps the mp_mode parameter, which
    # megatron.training.async_utils inspects.
    orig = _originals["megatron.core.dist_checkpointing.strategies.filesystem_async.get_write_results_queue"]
    return orig(mp_mode="fork")


def _cpu_causal_mask(sq):
    # #5 inside backward: torch 2.11 runs autograd.backward through the function modes and turns a
    # mode off while its own handler runs, so a recomputed forward inside backward (full recompute
    # without deallocate_pipeline_outputs) would build this literal device="cuda" mask for real.
    return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()


def _cpu_sliding_window_mask(sq, skv, window_size):
    m = torch.ones(sq, skv, dtype=torch.bool, device="cpu")
    return ~torch.tril(torch.triu(m, diagonal=skv - sq - window_size[0]), diagonal=skv - sq + window_size[1])


def _core_plan():
    """Patches megatron-core needs on CPU (no megatron.training import): for core-only loops too."""
    mod = importlib.import_module
    tp_random = mod("megatron.core.tensor_parallel.random")
    fs_async = mod("megatron.core.dist_checkpointing.strategies.filesystem_async")
    fused_softmax = mod("megatron.core.fusions.fused_softmax")
    cuda = torch.cuda
    return [
        # #2: enables model-parallel init and TP RNG seeding; torch.cuda.is_available() stays False
        (cuda, "device_count", lambda: 1),
        (cuda, "set_device", lambda device: None),  # #3
        (cuda, "current_device", lambda: 0),  # #4: ~130 sites use it as a device; the mode maps 0 to CPU
        (cuda, "synchronize", lambda device=None: None),  # #7: timers, p2p
        (cuda, "Stream", _FakeStream),  # #8
        (cuda, "current_stream", lambda device=None: _CURRENT_STREAM),  # #8
        (cuda, "stream", lambda stream=None: contextlib.nullcontext()),  # #8
        (cuda, "get_rng_state", _cpu_get_rng_state),  # #9: tracker.add, checkpoint rng state
        (cuda, "set_rng_state", _cpu_set_rng_state),  # #9: would be a queued lazy call that never runs
        (cuda, "manual_seed", _cpu_manual_seed),  # #9: likewise
        (tp_random, "_get_cuda_rng_state", _cpu_get_rng_state),  # #9: original needs CUDA generators
        (tp_random, "_set_cuda_rng_state", _cpu_set_rng_state),  # #9: the original is a lazy call
        (fs_async, "get_write_results_queue", _fork_results_queue),  # #14
        (fused_softmax, "get_default_causal_mask", _cpu_causal_mask),  # #5, see _cpu_causal_mask
        (fused_softmax, "get_sliding_window_causal_mask", _cpu_sliding_window_mask),
    ]


def _training_plan():
    """Patches Megatron-LM's training loop (megatron.training) needs on CPU."""
    mod = importlib.import_module
    training = mod("megatron.training.training")
    arguments = mod("megatron.training.arguments")
    return [
        (training, "initialize_megatron", _initialize_megatron_no_cuda),  # #1
        (arguments, "get_device_arch_version", lambda: 9),  # #11: would read CUDA device properties
        # #12: skips the torch.compile warm-up of fused kernels (+17-21 s per process)
        (training, "set_jit_fusion_options", lambda tp_size=None: None),
    ]


def install_cpu_shim(training: bool = True) -> bool:
    """Install the CPU patches (idempotent). Returns False, and changes nothing, when CUDA is available.

    ``training=False`` installs only what megatron-core needs and never imports megatron.training
    (for core-only stacks); a later call with ``training=True`` adds the rest.
    """
    global _installed, _installed_training, _mode
    if torch.cuda.is_available():
        return False
    plan = []
    if not _installed:
        plan += _core_plan()
    if training and not _installed_training:
        plan += _training_plan()
    for module, attr, _ in plan:  # all-or-nothing: check every target before patching any
        _check(module, attr)
    if not _installed:
        # #10 is not a CPU matter: the helper-build skip every entry point installs, GPU or CPU
        # (it checks its own target before changing anything).
        skip_helper_build_if_prebuilt()
    for module, attr, new in plan:
        _patch(module, attr, new)
    if not _installed:
        # #11: TP>1 asserts CUDA_DEVICE_MAX_CONNECTIONS == "1" on pre-Blackwell architectures.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        # #5, #6, #13: one mode, entered once and never exited.
        _mode = _CudaToCpuMode()
        _mode.__enter__()
        _installed = True
    _installed_training = _installed_training or training
    return True
