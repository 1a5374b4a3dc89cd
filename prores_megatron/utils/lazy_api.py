"""A package's public API, imported from its submodules on first use (PEP 562).

Contract: ``__getattr__, __dir__ = lazy_api(__name__, {"name": "submodule", ...})`` in a package's
``__init__`` makes ``package.name`` import ``package.submodule`` (or a relative module name such as
``..core.stepping``, for a name re-exported from below) the first time it is read and cache it on
the package, so importing a package never imports torch or Megatron by itself (``prores-megatron
plan`` and the schedule math stay light). Unknown names raise ``AttributeError`` as usual.
"""

import importlib
import sys


def lazy_api(package: str, exports: dict):
    def __getattr__(name):
        submodule = exports.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(submodule, package) if submodule.startswith(".") else (
            importlib.import_module(f"{package}.{submodule}"))
        value = getattr(module, name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
