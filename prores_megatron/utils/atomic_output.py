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
* ``check_output_path(output, force, protected=(), replaceable=None, log=None)`` and ``with
  staged_directory(output, force, replaceable=None) as tmp:`` do the same for a directory: ``tmp`` is
  a fresh, empty directory that is renamed to ``output`` on success; an existing ``output``
  directory is replaced only when ``force`` is true, only if it is empty or ``replaceable(output)``
  returns None (else the reason it is not), never when it holds the current directory, and only
  after the new one is complete (moved aside, the new one renamed in, the old one deleted).
* Staged names carry their writer, ``.<name>.partial-<pid>@<host>@<random>``, so a process killed
  outright (SIGKILL, the OOM killer) leaves something the next writer can judge: ``clear_leftovers``
  (called by both checks) removes a dead process's staged output from this host, puts back a
  previous output that a killed replacement had moved aside, refuses while a live process is
  writing the same output, and names what it cannot judge (another host, an unknown writer).
* ``check_free_space(path, needed, what)`` refuses before writing when the filesystem that will
  hold ``path`` has less than ``needed`` bytes free, naming both sizes.
"""

import glob
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["OutputExistsError", "OutputPathError", "check_outputs", "check_output_path", "staged_files",
           "staged_directory", "write_file_atomic", "clear_leftovers", "check_free_space"]

class OutputExistsError(ValueError):
    """An output cannot be (re)written."""


_OWNER = re.compile(r"^(?P<pid>\d+)@(?P<host>.+)@[^@]*$")


def _stage_prefix(name: str, kind: str) -> str:
    return f".{name}.{kind}-{os.getpid()}@{socket.gethostname()}@"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clear_leftovers(output, log=None, error=OutputExistsError):
    """Judge the staged outputs that earlier writers of ``output`` left beside it (module docstring).
    ``log(message)`` hears what was removed, restored or left alone; ``error`` is raised (naming the
    process) when a live process on this host is writing the same output."""
    output = Path(output).absolute()
    say = log or (lambda message: None)
    if not output.parent.is_dir():
        return
    host = socket.gethostname()
    found = sorted(output.parent.glob(f".{glob.escape(output.name)}.partial-*")) + sorted(
        output.parent.glob(f".{glob.escape(output.name)}.old-*"))
    for path in found:
        kind = "partial" if path.name.startswith(f".{output.name}.partial-") else "old"
        owner = _OWNER.match(path.name[len(f".{output.name}.{kind}-"):])
        if owner is None or owner["host"] != host:
            where = "an unknown writer" if owner is None else f"pid {owner['pid']} on host {owner['host']}"
            say(f"note: {path} looks like the leftover of an interrupted write of {output.name} by {where}; "
                "remove it yourself once no such write is running")
            continue
        pid = int(owner["pid"])
        if pid == os.getpid():
            continue
        if _alive(pid):
            raise error(f"{output}: process {pid} on this host is writing it right now ({path}); wait for it "
                        "or stop it first")
        previous = path / output.name
        if kind == "old" and previous.exists() and not output.exists():
            os.rename(previous, output)  # the replacement was killed between its two renames
            shutil.rmtree(path, ignore_errors=True)
            say(f"restored the previous {output} from {path.name}, which an interrupted replacement "
                f"(pid {pid}) had moved aside")
            continue
        _remove(path)
        say(f"removed {path}, left by an interrupted write (pid {pid}, no longer running)")


def check_free_space(path, needed: int, what: str, error=OutputExistsError):
    """Refuse (``error``) when the filesystem for ``path`` has fewer than ``needed`` bytes free."""
    free = shutil.disk_usage(writable_ancestor(Path(path).absolute())).free
    if free < needed:
        raise error(f"{what}: needs {needed / 1e9:.2f} GB on the filesystem of {path}, but only "
                    f"{free / 1e9:.2f} GB are free; free space or choose another location")
    return free


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


def check_outputs(paths, force: bool, flag: str, log=None):
    """Refuse before any work; returns the absolute paths."""
    out = [Path(p).absolute() for p in paths]
    for path in out:
        clear_leftovers(path, log)
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
            fd, name = tempfile.mkstemp(prefix=_stage_prefix(path.name, "partial"), dir=path.parent)
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
    fd, tmp = tempfile.mkstemp(prefix=_stage_prefix(path.name, "partial"), dir=path.parent)
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


def _check_replaceable(output: Path, replaceable):
    """Raise unless the existing directory ``output`` may be replaced (module docstring)."""
    cwd = Path.cwd().resolve()
    if output.resolve() == cwd or output.resolve() in cwd.parents:
        raise OutputPathError(f"output {output} contains the current directory; --force never replaces it")
    if not any(output.iterdir()) or replaceable is None:
        return
    reason = replaceable(output)
    if reason is not None:
        raise OutputPathError(f"output {output} exists and {reason}; --force replaces only an empty directory "
                              "or a previous output of this command: remove it yourself or choose another directory")


def check_output_path(output, force: bool, protected=(), replaceable=None, log=None) -> Path:
    """Refuse an output that exists (without force, or with force when it is neither empty nor
    ``replaceable``), is not a directory, or would swallow one of ``protected`` (e.g. the
    checkpoint being read); clear the leftovers of killed writers. Returns the absolute path."""
    output = Path(output).absolute()
    for p in protected:
        p = Path(p).resolve()
        if p == output.resolve() or output.resolve() in p.parents:
            raise OutputPathError(f"output {output} contains the checkpoint {p}; choose another directory")
    clear_leftovers(output, log, error=OutputPathError)
    if output.exists() or output.is_symlink():
        if not output.is_dir() or output.is_symlink():
            raise OutputPathError(f"output {output} exists and is not a directory; refusing to replace it")
        if not force:
            raise OutputPathError(f"output {output} already exists; pass --force to replace it")
        _check_replaceable(output, replaceable)
    ancestor = writable_ancestor(output)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"output {output}: {ancestor} is not writable")
    return output


@contextmanager
def staged_directory(output, force: bool, replaceable=None):
    output = Path(output).absolute()
    created = None  # the topmost parent we had to create, removed again on failure
    ancestor = output.parent
    while not ancestor.exists():
        created = ancestor
        ancestor = ancestor.parent
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_stage_prefix(output.name, "partial"), dir=output.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the export is an ordinary directory
    try:
        yield tmp
        if output.exists():
            if not force:  # it appeared while we were writing
                raise OutputPathError(f"output {output} already exists; pass --force to replace it")
            _check_replaceable(output, replaceable)  # again: it may have changed while we wrote
            old = Path(tempfile.mkdtemp(prefix=_stage_prefix(output.name, "old"), dir=output.parent))
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
