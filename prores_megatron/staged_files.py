"""A set of output files that appears complete or not at all.

Contract:
* ``check_outputs(paths, force, flag)`` refuses up front (``OutputExistsError``, naming the file,
  ``flag`` and ``--force``) when one of ``paths`` exists and ``force`` is false, when one is a
  directory, or when its directory cannot be created or written. Callers run it before any work.
* ``with staged_files(paths, force, markers=1) as tmp:`` yields ``{final: temporary}``, every
  temporary name a hidden ``.<name>.partial-*`` file in the final file's own directory (so the
  renames are atomic), and the caller writes them all. If the block raises anything
  (KeyboardInterrupt and SystemExit included), every temporary file is removed, directories created
  for the outputs are removed again, and the existing outputs are untouched. On success the files
  are renamed into place in the order given; the last ``markers`` paths are commit markers. With
  ``force``, existing markers are deleted before the first rename, so an interruption mid-way never
  leaves an old marker beside new data (a Megatron dataset is opened through its ``.idx``, so the
  ``.idx`` files are the markers and go last).
"""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["OutputExistsError", "check_outputs", "staged_files"]


class OutputExistsError(ValueError):
    """An output cannot be (re)written."""


def writable_ancestor(path: Path) -> Path:
    """The nearest existing parent of ``path``: where creating it will need write access."""
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    return ancestor


def current_umask() -> int:
    """The process umask (reading it means setting it; set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def check_outputs(paths, force: bool, flag: str):
    """Refuse before any work; returns the absolute paths."""
    out = [Path(p).absolute() for p in paths]
    for path in out:
        if path.is_dir():
            raise OutputExistsError(f"{flag}: {path} is a directory; choose another output prefix")
        if (path.exists() or path.is_symlink()) and not force:
            raise OutputExistsError(
                f"{flag}: {path} already exists; pass --force to replace it (it is replaced only "
                "once the new output is complete), or choose another output prefix"
            )
        ancestor = writable_ancestor(path)
        if not ancestor.is_dir():
            raise OutputExistsError(f"{flag}: {ancestor} is not a directory, so {path} cannot be created")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise OutputExistsError(f"{flag}: {ancestor} is not writable, so {path} cannot be created")
    return out


@contextmanager
def staged_files(paths, force: bool, markers: int = 1):
    paths = [Path(p).absolute() for p in paths]
    created = []  # directories made for the outputs, removed again on failure (deepest first)
    for path in paths:
        missing = []
        d = path.parent
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
    tmp = {}
    try:
        for path in paths:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
            os.close(fd)
            tmp[path] = Path(name)
        yield dict(tmp)
        mode = 0o666 & ~current_umask()  # mkstemp makes private files; outputs are ordinary files
        for t in tmp.values():
            os.chmod(t, mode)
        if force:
            for marker in paths[len(paths) - markers:]:
                if marker.exists() or marker.is_symlink():
                    marker.unlink()
        for path in paths:
            os.replace(tmp[path], path)
    except BaseException:
        for t in tmp.values():
            try:
                t.unlink()
            except FileNotFoundError:
                pass
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
        raise
