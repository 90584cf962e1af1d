"""Creating the run dir: a directory that cannot be made or written is one ConfigError line."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from finetune.errors import ConfigError


def ensure_run_dir(path: Path) -> Path:
    """Create ``path`` (and its parents) and check a file can be written in it; returns it
    resolved. ``output_dir=/proc/x``, a path under a file, a read-only mount: ConfigError."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"output_dir={path}: cannot create {path} (a file of that name exists); "
                          "choose a writable directory") from None
    except OSError as exc:
        where = exc.filename or path
        raise ConfigError(f"output_dir={path}: cannot create {where} ({exc.strerror}); "
                          "choose a writable directory") from None
    try:  # mkdir succeeds on an existing read-only dir: writing is what the run needs
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"output_dir={path}: cannot write in {path} ({exc.strerror}); "
                          "choose a writable directory") from None
    return path.resolve()
