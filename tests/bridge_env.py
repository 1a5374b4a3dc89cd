"""Megatron-Bridge 0.6.2 on CPU: its real callback and config modules, without ``megatron/bridge/__init__``.

``import megatron.bridge`` imports every model family (it needs transformers <= 5.12.1, diffusers,
modelopt, Transformer Engine, ...), which cannot be installed beside this CPU stack. The modules
ProRes uses (``training.callbacks``, ``utils.instantiate_utils``, ``training.utils.config_utils``)
import on CPU once the package's ``__init__`` is not run: when the full import fails,
``load_bridge()`` registers ``megatron.bridge`` as a bare package (its real ``__path__``), so
everything imported below it is Bridge's own code. It returns None, or why Bridge is unavailable
(``pip install --no-deps megatron-bridge==0.6.2``, as tools/setup_env.sh does).
"""

import importlib
import importlib.util
import sys
import types


def _bare_package(name):
    spec = importlib.util.find_spec(name)
    module = types.ModuleType(name)
    module.__path__ = list(spec.submodule_search_locations)
    module.__spec__ = spec
    sys.modules[name] = module


def load_bridge():
    if importlib.util.find_spec("megatron.bridge") is None:
        return "megatron-bridge is not installed (pip install --no-deps megatron-bridge==0.6.2)"
    try:
        importlib.import_module("megatron.bridge")
    except ImportError:
        for name in [n for n in sys.modules if n == "megatron.bridge" or n.startswith("megatron.bridge.")]:
            del sys.modules[name]  # the half-imported package
        _bare_package("megatron.bridge")
    importlib.import_module("megatron.bridge.training.callbacks")
    return None
