"""Output directories transferkit owns: the guard every writer calls, atomic publication, stale temp clean-up.

The promise: a command replaces only what transferkit itself wrote, and never touches the user's data.
Every output directory carries a marker file (MARKER) naming its kind and, once published, every file
transferkit put in it. A directory without the marker (whatever else it holds: a `meta.json`, `*.npz`,
a `config.json` of another tool) is never written into or replaced; neither is a directory that is,
contains or lies inside an input (DATA, a feature directory, a model).

Two ways to write, both through this module:
- `building(out, kind)`: build in a hidden sibling, then swap it in with one rename (features, probes,
  evaluations, converted models). A failed run leaves the old output as it was.
- `claim(out, kind)`: create (or reopen) a directory that is written in place over a long job
  (fine-tuning runs with their checkpoints, recipe runs, the demo, dense maps).

Hidden siblings are named `.NAME.PID.HEX.tmp`; one left behind by a killed process (its PID no longer
runs on this host) is removed by the next write to NAME.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from transferkit.errors import TransferkitError
from transferkit.runtime.atomic import write_json_atomic

log = logging.getLogger(__name__)

MARKER = ".transferkit-output.json"
FORMAT = "transferkit.output/1"


class OutputError(TransferkitError):
    """An output path transferkit may not write: not its own, or the user's data."""


def read_marker(path: str | Path) -> dict | None:
    """The marker of a directory transferkit wrote, or None (no marker, or not ours)."""
    file = Path(path) / MARKER
    try:
        marker = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == FORMAT else None


def check_output(out: str | Path, kind: str, *, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Raise OutputError unless transferkit may write a `kind` output at `out`; return `out`.

    Allowed: a path that does not exist, an empty directory, or a directory with a `kind` marker.
    Refused: anything else, and any `out` that is, contains or lies inside one of `inputs`.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output '{out}' exists and is not a directory; choose another path")
    where = out.resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        data = Path(given).resolve()
        if where == data or data.is_dir() and where.is_relative_to(data):
            raise OutputError(f"output '{out}' is {'' if where == data else 'inside '}the input '{given}'; "
                              "choose an output folder outside your data")
        if data.is_relative_to(where):
            raise OutputError(f"output '{out}' contains the input '{given}'; choose an output folder outside "
                              "your data")
    if out.is_dir() and any(out.iterdir()):
        marker = read_marker(out)
        if marker is None:
            raise OutputError(f"output '{out}' exists and was not written by transferkit (no {MARKER}); "
                              "choose a new folder, or empty it yourself")
        if marker.get("kind") != kind:
            raise OutputError(f"output '{out}' holds a transferkit {marker.get('kind')!r} output, not a {kind!r} "
                              "one; choose another folder")
        strangers = sorted(set(_files(out)) - set(marker["files"])) if marker.get("files") is not None else []
        if strangers:  # a published output is replaced whole: only if nothing else was put in it
            raise OutputError(f"output '{out}' holds files transferkit did not write ({', '.join(strangers[:3])}"
                              f"{', ...' if len(strangers) > 3 else ''}); move them or choose another folder")
    return out


def check_output_file(path: str | Path, ours: Callable[[Path], bool]) -> Path:
    """Raise OutputError unless `path` is free or a file transferkit wrote (`ours(path)` tells); return it."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output '{path}' is a directory; name a file")
    if path.exists() and not ours(path):
        raise OutputError(f"output '{path}' exists and was not written by transferkit; choose a new file name, "
                          "or remove it yourself")
    return path


def claim(out: str | Path, kind: str, *, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Check `out` (see `check_output`), create it if need be and mark it as a `kind` output; return it."""
    out = check_output(out, kind, inputs=inputs)
    remove_stale(out)
    out.mkdir(parents=True, exist_ok=True)
    if read_marker(out) is None:
        _write_marker(out, kind, files=None)
    return out


@contextlib.contextmanager
def building(out: str | Path, kind: str, *, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a fresh hidden directory to write a `kind` output into; on success publish it at `out`.

    The old `out` (checked first, and again at the swap) is replaced only if every file in it was written
    by transferkit; on any error the hidden directory is removed and `out` stays as it was.
    """
    inputs = list(inputs)
    out = check_output(out, kind, inputs=inputs)
    tmp = new_tmp(out, kind)
    try:
        yield tmp
        publish(tmp, out, kind, inputs=inputs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def new_tmp(out: Path, kind: str) -> Path:
    """A new hidden sibling of `out` to build a `kind` output in (marked, so clean-up knows it is ours)."""
    remove_stale(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    _write_marker(tmp, kind, files=None)
    return tmp


def publish(tmp: Path, out: Path, kind: str, *, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Swap the finished directory `tmp` in at `out`, listing its files in the marker.

    Two runs publishing to one `out` at once both succeed, the last one's output staying: a rename that
    finds `out` taken or gone since it looked checks again and retries.
    """
    _write_marker(tmp, kind, files=_files(tmp))
    for attempt in range(5):
        check_output(out, kind, inputs=inputs)  # again: the folder may have changed while the output was built
        old = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.old")
        try:
            if out.exists():
                os.replace(out, old)
        except FileNotFoundError:  # another run moved it away first: look again
            continue
        try:
            os.replace(tmp, out)
        except OSError as e:
            with contextlib.suppress(OSError):
                if old.exists():
                    os.replace(old, out)  # the previous output goes back
            if attempt == 4 or e.errno not in (errno.EEXIST, errno.ENOTEMPTY):  # not "another run published"
                raise
            continue
        shutil.rmtree(old, ignore_errors=True)
        return out
    return out


def add_files(out: str | Path, names: Iterable[str]) -> None:
    """Record files transferkit added to a published output later (a sweep's results beside the codes)."""
    marker = read_marker(out)
    if marker is not None and marker.get("files") is not None:
        marker["files"] = sorted(set(marker["files"]) | set(names))
        write_json_atomic(Path(out) / MARKER, marker)


def remove_stale(out: Path) -> list[Path]:
    """Delete hidden build directories of `out` left by processes that no longer run here; return them.

    Only directories named `.NAME.PID.HEX.tmp|old` that hold a transferkit marker qualify.
    """
    gone = []
    for path in out.parent.glob(f".{_glob_escape(out.name)}.*") if out.parent.is_dir() else ():
        pid, _, suffix = path.name[len(out.name) + 2:].partition(".")
        if not (path.is_dir() and pid.isdigit() and suffix[-4:] in (".tmp", ".old") and len(suffix) == 12):
            continue
        marker = read_marker(path)
        other_host = suffix.endswith(".tmp") and marker is not None and marker.get("host") != socket.gethostname()
        if marker is None or other_host or pid_alive(int(pid)):
            continue
        log.info("removing %s, left by process %s that no longer runs", path, pid)
        shutil.rmtree(path, ignore_errors=True)
        gone.append(path)
    return gone


def pid_alive(pid: object) -> bool:
    """Whether process `pid` runs on this host (True when that cannot be told: never delete on a guess)."""
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _write_marker(path: Path, kind: str, files: list[str] | None) -> None:
    from transferkit import __version__

    write_json_atomic(path / MARKER, {
        "format": FORMAT, "kind": kind, "transferkit": __version__, "pid": os.getpid(), "host": socket.gethostname(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": files,
    })


def _files(root: Path) -> list[str]:
    """Every file below `root` (relative, '/'-separated), the marker left out."""
    names = []
    for dirpath, _, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        names += [(rel / f).as_posix() for f in filenames]
    return sorted(n for n in names if n != MARKER)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
