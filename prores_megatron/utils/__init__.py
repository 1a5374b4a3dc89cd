"""Helpers every layer may use: output that appears complete or not at all, lazy package APIs, a free
loopback port for a local rendezvous."""

from .lazy_api import lazy_api

_EXPORTS = {name: "atomic_output" for name in (
    "OutputExistsError", "OutputPathError", "check_output_path", "check_outputs", "staged_directory",
    "staged_files", "write_file_atomic")}
_EXPORTS["free_port"] = "ports"

__all__ = ["lazy_api", *_EXPORTS]
__getattr__, __dir__ = lazy_api(__name__, _EXPORTS)
