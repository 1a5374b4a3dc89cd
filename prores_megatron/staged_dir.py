"""An output directory that appears complete or not at all.

Contract: ``with staged_directory(output, force) as tmp:`` yields a fresh, empty directory next to
``output`` (same filesystem, hidden name ``.<name>.partial-*``). If the block raises anything
(including KeyboardInterrupt / SystemExit), the temporary directory and any parent directories
created for it are removed and the exception propagates; ``output`` is untouched. If the block
succeeds, the directory is renamed to ``output``; an existing ``output`` directory is replaced
only when ``force`` is true, and only after the new one is complete (it is moved aside, the new one
renamed in, then the old one deleted). ``check_output_path`` makes the same decisions up front so
a caller can refuse before doing any work.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .staged_files import current_umask, writable_ancestor


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
