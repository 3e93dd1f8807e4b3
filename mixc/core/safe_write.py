"""One rule for every file mixc writes (docs/security.md, "Writes").

Run folders, caches and output paths are shared the way model files are, so a
name in them may be a symbolic link planted by someone else, pointing at a file
of the user's. Every write therefore goes through this module:

- a whole file is written to a fresh temporary beside it (``mkstemp``: created
  with ``O_CREAT | O_EXCL``, which never follows a link), fsynced, then renamed
  over the target (readers see the old file or the new one, never half);
- an append opens the file with ``O_NOFOLLOW``;
- a target that is a symbolic link (or a folder, where a file is meant) is
  refused with a :class:`WriteError` naming it, before anything is written;
- :func:`check_output` refuses an output that is one of the command's own
  inputs, or an existing file, unless the caller passes ``force``.

Standard library only (``tempfile``, ``os``): the pieces exist, but no library
combines "no link, same folder, fsync, rename" for text, bytes and writers that
need a path (matplotlib, numpy, torch.export, onnx), hence this small module.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mixc.core.errors import MixcError

__all__ = [
    "WriteError",
    "default_mode",
    "refuse_link",
    "write_with",
    "write_bytes",
    "write_text",
    "write_json",
    "append_text",
    "copy_file",
    "open_nofollow",
    "check_output",
    "replace_folder",
]


class WriteError(MixcError):
    """An output mixc will not write: a link, a folder in the way, one of the command's inputs, an
    existing file."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the umask (mkstemp's 0600 would hide
    shared files)."""
    return 0o666 & ~_umask()


def _link_error(path: Path) -> WriteError:
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return WriteError(
        f"{path} is a symbolic link{target}; mixc does not write through links, which could"
        " overwrite a file outside the folder it writes; hint: remove the link (or replace it with"
        " a real file or folder), or write somewhere else"
    )


def refuse_link(path: str | os.PathLike) -> None:
    """Raise :class:`WriteError` if ``path`` is a symbolic link (dangling or not)."""
    path = Path(path)
    if path.is_symlink():
        raise _link_error(path)


def _target(path: str | os.PathLike, folder_ok: bool = False) -> Path:
    path = Path(path)
    refuse_link(path)
    if not folder_ok and path.is_dir():
        raise WriteError(
            f"{path} is a folder, not a file; hint: name a file to write (or remove the folder)"
        )
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise WriteError(
            f"cannot write {path}: {parent} is a file, not a folder; hint: name a path in a folder"
        ) from None
    except NotADirectoryError:
        raise WriteError(
            f"cannot write {path}: a part of {parent} is a file, not a folder; hint: name a path "
            "in a folder"
        ) from None
    return path


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_with(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Have ``write(tmp)`` fill a fresh temporary beside ``path``, fsync it, rename it over
    ``path``.

    For writers that need a file name (matplotlib, numpy, torch.export, onnx); ``suffix`` ends the
    temporary's name (some writers pick the format from it). The temporary is removed on any error.
    """
    path = _target(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        os.close(fd)
        write(tmp)
        os.chmod(tmp, default_mode())  # after the writer: some (safetensors) recreate the file 0600
        _fsync_path(tmp)
        # a link planted while we wrote is replaced by the rename, never followed; say so
        refuse_link(path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` into ``path`` atomically (temporary beside it, fsync, rename)."""

    def fill(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return write_with(path, fill)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) into ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON into ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def open_nofollow(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a link at ``path`` (``O_NOFOLLOW``) with a :class:`WriteError`
    naming it."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP or Path(path).is_symlink():
            raise _link_error(Path(path)) from None
        raise


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to ``path`` (created if missing) without following a link; fsynced."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, default_mode())
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` atomically, so a reader never sees half a checkpoint."""
    return write_with(dst, lambda tmp: shutil.copyfile(src, tmp))


def replace_folder(out: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Have ``fill(tmp)`` fill a fresh temporary folder beside ``out``, then put it in ``out``'s
    place.

    An existing ``out`` (a folder, never a link: refused) is removed just before the rename.
    """
    out = Path(out)
    refuse_link(out)
    if out.exists() and not out.is_dir():
        raise WriteError(
            f"{out} is a file, not a folder; hint: name a folder to write (or remove the file)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # not mkdtemp's 0700: exports are shared
        fill(tmp)
        refuse_link(out)
        if out.is_dir():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(
    path: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
    option: str = "-o",
    folder_ok: bool = False,
) -> Path:
    """Refuse ``path`` as an output: a link, or one of ``inputs`` (the same file by any name),
    always; an existing file (or folder, with ``folder_ok``) unless ``force``."""
    path = Path(path)
    refuse_link(path)
    for given in inputs:
        given = Path(given)
        if _same(path, given):
            raise WriteError(
                f"{option} {path} is an input of this command ({given}); writing it would destroy "
                f"what is being read; hint: pass another {option} path"
            )
    if path.is_dir() and not folder_ok:
        raise WriteError(
            f"{option} {path} is a folder, not a file; hint: name a file to write (or remove the"
            " folder)"
        )
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise WriteError(
            f"{option} {path}: {above} is a file, not a folder; hint: name a path in a folder"
        )
    if path.exists() and not force:
        kind = "folder" if path.is_dir() else "file"
        raise WriteError(
            f"{option} {path} already exists (a {kind}); mixc does not overwrite a file it may not "
            f"have written; hint: pass another {option} path, or --force to replace it"
        )
    return path
