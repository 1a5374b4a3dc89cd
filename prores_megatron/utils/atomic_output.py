"""Output that appears complete or not at all: one file, a set of files, or a directory.

Every writer stages its output under a hidden ``.<name>.partial-*`` name in the final location's own
directory (same filesystem, so the closing rename is atomic) and renames it into place only once it
is complete. If the block raises anything (KeyboardInterrupt and SystemExit included), the staged
output and any directories created for it are removed and the existing output is untouched.

Contract:
* ``write_file_atomic(path, data, mode=0o644)`` writes ``data`` (bytes) to ``path``.
* ``check_outputs(paths, force, flag)`` refuses up front (``OutputExistsError``, naming the file,
  ``flag`` and ``--force``) when one of ``paths`` exists and ``force`` is false, when one is a
  directory, or when its directory cannot be created or written. Callers run it before any work.
* ``with staged_files(paths, force, markers=1) as tmp:`` yields ``{final: temporary}`` and the
  caller writes them all. On success the files are renamed into place in the order given; the last
  ``markers`` paths are commit markers. With ``force``, existing markers are deleted before the
  first rename, so an interruption mid-way never leaves an old marker beside new data (a Megatron
  dataset is opened through its ``.idx``, so the ``.idx`` files are the markers and go last).
* ``check_output_path(output, force, protected=())`` and ``with staged_directory(output, force) as
  tmp:`` do the same for a directory: ``tmp`` is a fresh, empty directory that is renamed to
  ``output`` on success; an existing ``output`` directory is replaced only when ``force`` is true,
  and only after the new one is complete (moved aside, the new one renamed in, the old one deleted).
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["OutputExistsError", "OutputPathError", "check_outputs", "check_output_path", "staged_files",
           "staged_directory", "write_file_atomic"]


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


def write_file_atomic(path, data: bytes, mode: int = 0o644):
    """``data`` to ``path`` through a staged file in the same directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class OutputPathError(ValueError):
    """The output path cannot be (re)written."""


def check_output_path(output, force: bool, protected=()) -> Path:
    """Refuse an output that exists (without force), is not a directory, or would swallow one of
    ``protected`` (e.g. the checkpoint being read). Returns the absolute path."""
    output = Path(output).absolute()
    for p in protected:
        p = Path(p).resolve()
        if p == output.resolve() or output.resolve() in p.parents:
            raise OutputPathError(f"output {output} contains the checkpoint {p}; choose another directory")
    if output.exists() or output.is_symlink():
        if not output.is_dir() or output.is_symlink():
            raise OutputPathError(f"output {output} exists and is not a directory; refusing to replace it")
        if not force:
            raise OutputPathError(f"output {output} already exists; pass --force to replace it")
    ancestor = writable_ancestor(output)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"output {output}: {ancestor} is not writable")
    return output


@contextmanager
def staged_directory(output, force: bool):
    output = Path(output).absolute()
    created = None  # the topmost parent we had to create, removed again on failure
    ancestor = output.parent
    while not ancestor.exists():
        created = ancestor
        ancestor = ancestor.parent
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the export is an ordinary directory
    try:
        yield tmp
        if output.exists():
            if not force:  # it appeared while we were writing
                raise OutputPathError(f"output {output} already exists; pass --force to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.rename(output, old / output.name)
            try:
                os.rename(tmp, output)
            except BaseException:
                os.rename(old / output.name, output)  # put the previous export back
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
