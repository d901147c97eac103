"""The patch registry: the patches a server may apply, on a folder that replicas can share.

Ids are digests (``sha256:…``) or registered names (letters, digits, ``._-``), never file paths:
a request cannot make the server open a file of its choosing. The folder holds each patch as
``<hex digest>.fpatch.safetensors`` (the bytes as uploaded, signature included) and
``registry.json`` (names and the default set); every write goes aside and is renamed into place,
so a reader (another replica) sees the old registry or the new one, never half of one. Readers
re-read ``registry.json`` when its stat changes: a switch on one replica reaches the others.
Every read-modify-write of ``registry.json`` holds an inter-process lock (``.registry.lock``, a
``filelock``) and re-reads the index under it, so replicas writing at once lose no update.

A patch file is loaded only if the digest of what it holds is the digest its name says; a
mismatch (a file renamed or overwritten by hand) is skipped and logged, never served under the
wrong id. Errors never carry the folder's path: answers to clients must not reveal server paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from forgetpack.format.errors import ForgetpackError, PatchError, one_line
from forgetpack.format.fileio import write_bytes_atomic
from forgetpack.format.patch import MAX_PATCH_BYTES, Patch, describe, read_patch
from forgetpack.format.signing import require_signed

INDEX = "registry.json"
SUFFIX = ".fpatch.safetensors"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
LOCK = ".registry.lock"
LOCK_TIMEOUT_S = 30.0
log = logging.getLogger("runtime.serve")


class UnknownPatch(ForgetpackError):
    """An id that names no registered patch (HTTP 404 on its own route, 422 inside a request)."""


class PatchInUse(ForgetpackError):
    """Deleting a patch that the default set uses (HTTP 409)."""


class RegistryUnavailable(ForgetpackError):
    """The registry folder or its index cannot be read or written (HTTP 503); the message names no path."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or DIGEST_RE.fullmatch(name):
        raise ForgetpackError(f"patch name {str(name)[:70]!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


class PatchRegistry:
    """Patches by digest, names, and the default set; thread-safe, persisted when given a folder."""

    def __init__(self, folder: str | os.PathLike[str] | None, check: Callable[[Patch], None],
                 trusted_keys: Sequence[Any] | None = None, read_only: bool = False):
        """``read_only``: read the folder (a missing one is empty), never create or write it (``serve --check``)."""
        self.folder = Path(folder) if folder is not None else None
        self._check = check  # raises unless the patch fits the served model's base
        self._keys = trusted_keys
        self._lock = threading.Lock()
        self._patches: dict[str, Patch] = {}
        self._names: dict[str, str] = {}
        self._default: tuple[str, ...] = ()
        self._stamp: tuple[int, int, int] | None = None
        self.read_only = read_only
        self._file_lock = FileLock(str(self.folder / LOCK), timeout=LOCK_TIMEOUT_S) if self.folder is not None else None
        if self.folder is not None:
            if self.folder.exists() and not self.folder.is_dir():
                raise ForgetpackError(f"{self.folder}: is not a folder (the patch registry is a folder)")
            if not read_only:
                self.folder.mkdir(parents=True, exist_ok=True)
            for path in sorted(self.folder.glob(f"[0-9a-f]*{SUFFIX}")):
                self._load_file(path)
            self.refresh()

    # -- reading ---------------------------------------------------------------------

    @property
    def default(self) -> tuple[str, ...]:
        self.refresh()
        return self._default

    def refresh(self) -> None:
        """Re-read ``registry.json`` if another process (a replica) replaced it."""
        if self.folder is None:
            return
        index = self.folder / INDEX
        try:
            st = index.stat()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise RegistryUnavailable(f"the patch registry's index ({INDEX}) cannot be read ({exc.strerror})") from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        with self._lock:
            self._names, self._default = self._read_index(index)
            self._stamp = stamp

    @staticmethod
    def _read_index(index: Path) -> tuple[dict[str, str], tuple[str, ...]]:
        """Names and the default set from ``registry.json``; the one rule for what a valid index is."""
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            names, default = dict(data["names"]), tuple(data["default"])
            if not all(isinstance(k, str) and isinstance(v, str) and DIGEST_RE.fullmatch(v) for k, v in names.items()):
                raise ValueError("a name that is not text, or names no digest")
            if not all(isinstance(d, str) and DIGEST_RE.fullmatch(d) for d in default):
                raise ValueError("a default entry that is not a digest")
        except FileNotFoundError:
            return {}, ()
        except OSError as exc:  # never str(exc): it holds the path
            raise RegistryUnavailable(f"the patch registry's index ({INDEX}) cannot be read ({exc.strerror})") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            reason = type(exc).__name__ if isinstance(exc, (KeyError, TypeError, AttributeError)) else one_line(exc, 120)
            log.error("%s: unreadable registry index (%s)", index, exc)
            raise RegistryUnavailable(f"the patch registry's index ({INDEX}) is unreadable ({reason}); "
                                      "the operator must repair or remove it") from None
        return names, default

    def get(self, digest: str) -> Patch:
        patch = self._patches.get(digest)
        if patch is None and self.folder is not None and DIGEST_RE.fullmatch(digest):
            path = self.folder / f"{digest.split(':', 1)[1]}{SUFFIX}"
            if path.is_file():  # uploaded through another replica
                patch = self._load_file(path)
        if patch is None:
            raise UnknownPatch(f"{digest[:23]}…: no such patch in the registry")
        return patch

    def digests(self, ids: Sequence[str]) -> tuple[str, ...]:
        """The digests an ordered list of ids names (digests or names); unknown or repeated ids are errors."""
        if ids:  # names need the index; an empty set (the base) needs nothing, even when the index is broken
            self.refresh()
        out: list[str] = []
        for pid in ids:
            if not isinstance(pid, str):
                raise UnknownPatch(f"patch id {pid!r} is not text")
            if DIGEST_RE.fullmatch(pid):
                digest = pid
            elif NAME_RE.fullmatch(pid) and pid in self._names:
                digest = self._names[pid]
            else:
                raise UnknownPatch(f"{pid[:70]!r}: no patch with this id or name in the registry (see GET /v1/patches)")
            if digest not in self._patches:
                self.get(digest)  # another replica may have added it
            if digest in out:
                raise ForgetpackError(f"{pid[:70]!r}: the same patch is named twice in one patch set")
            out.append(digest)
        return tuple(out)

    def resolve(self, ids: Sequence[str]) -> tuple[Patch, ...]:
        """The patches an ordered list of ids names."""
        return tuple(self.get(d) for d in self.digests(ids))

    def entries(self) -> list[dict[str, Any]]:
        """Each patch's metadata (from the format library), with its names and whether it is a default."""
        self.refresh()
        names: dict[str, list[str]] = {}
        for name, digest in self._names.items():
            names.setdefault(digest, []).append(name)
        out = []
        for digest, patch in sorted(self._patches.items()):
            meta = describe(patch)
            out.append({"id": digest, "names": sorted(names.get(digest, [])), "default": digest in self._default,
                        "model": patch.model, "rank": patch.rank, "forget": list(patch.recipe.get("forget", []) or []),
                        "signed_by": patch.key_id, "created": patch.created, "size_bytes": meta.get("size_bytes"),
                        "metadata": meta})
        return out

    # -- writing ---------------------------------------------------------------------

    def add_bytes(self, data: bytes, name: str | None = None) -> Patch:
        """Validate an uploaded patch (format, digest, signature when keys are set, fit) and register it."""
        if len(data) > MAX_PATCH_BYTES:
            raise PatchError(f"upload: too large for a patch ({len(data)} bytes, at most {MAX_PATCH_BYTES})")
        where = self.folder if self.folder is not None and not self.read_only else None
        try:
            fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".tmp", dir=where)  # never matched by the *SUFFIX scan
        except OSError as exc:  # the folder was removed or made read-only under the running server
            raise self._unwritable(exc) from None
        try:
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
            except OSError as exc:
                raise self._unwritable(exc) from None
            try:
                patch = dataclasses.replace(read_patch(tmp), source=None)  # named by digest, never by the temp path
                return self._register(patch, Path(tmp), name)
            except RegistryUnavailable:
                raise
            except ForgetpackError as exc:
                raise type(exc)(str(exc).replace(tmp, "upload")) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def add_file(self, path: str | os.PathLike[str], name: str | None = None) -> Patch:
        """Register a patch file (the CLI's ``--default-patch FILE``); the file itself is copied, not kept."""
        patch = read_patch(path)
        return self._register(patch, Path(path), name)

    def _register(self, patch: Patch, path: Path, name: str | None) -> Patch:
        name = check_name(name) if name is not None else None
        require_signed([patch], self._keys)
        self._check(patch)
        digest = patch.digest
        with self._locked():
            if self._persisting:
                target = self._file_of(digest)
                # a file already there is kept only if it loads under the current policy: an unsigned
                # copy of the same digest is replaced by the signed upload (atomically), not left to
                # be skipped at the next start
                if not target.exists() or self._loadable(target) is None:
                    data = path.read_bytes()
                    try:
                        write_bytes_atomic(target, data)
                    except OSError as exc:
                        raise self._unwritable(exc) from None
            self._patches[digest] = patch
            if name is not None:
                self._write({**self._names, name: digest}, self._default)
        return patch

    def remove(self, pid: str) -> Patch:
        (digest,) = self.digests([pid])
        patch = self.get(digest)
        with self._locked():
            if digest in self._default:
                raise PatchInUse(f"{pid[:70]!r}: is in the default patch set; switch the default first (PUT /v1/default-patches)")
            self._write({n: d for n, d in self._names.items() if d != digest}, self._default)
            self._patches.pop(digest, None)
            if self._persisting:
                self._file_of(digest).unlink(missing_ok=True)
        return patch

    def set_default(self, digests: Sequence[str]) -> tuple[str, ...]:
        """Make the patches with ``digests`` (already checked as a set) the default, in one step."""
        with self._locked():
            self._write(self._names, tuple(digests))
        return self._default

    # -- the write path --------------------------------------------------------------

    @property
    def _persisting(self) -> bool:
        return self.folder is not None and not self.read_only

    def _file_of(self, digest: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{digest.split(':', 1)[1]}{SUFFIX}"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The thread lock, and while persisting the inter-process lock, with the index re-read under
        them: a read-modify-write starts from what the other replicas wrote, and none is lost."""
        with self._lock:
            if not self._persisting:
                yield
                return
            assert self._file_lock is not None and self.folder is not None
            try:
                self._file_lock.acquire()
            except Timeout:
                raise RegistryUnavailable(f"the patch registry is locked by another replica for over {LOCK_TIMEOUT_S:.0f} s") from None
            except OSError as exc:
                raise self._unwritable(exc) from None
            try:
                index = self.folder / INDEX
                self._names, self._default = self._read_index(index)
                with contextlib.suppress(OSError):
                    st = index.stat()
                    self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
                yield
            finally:
                self._file_lock.release()

    @staticmethod
    def _unwritable(exc: OSError) -> RegistryUnavailable:
        log.error("patch registry: cannot write (%s)", exc)
        return RegistryUnavailable(f"the patch registry folder cannot be written ({exc.strerror or type(exc).__name__}); "
                                   "the operator must restore it")

    def _write(self, names: dict[str, str], default: tuple[str, ...]) -> None:
        """Persist first, then switch memory: a failed write leaves both as they were (locks held)."""
        if self._persisting:
            assert self.folder is not None
            index = self.folder / INDEX
            try:
                write_bytes_atomic(index, json.dumps({"version": 1, "names": names, "default": list(default)}, indent=1).encode())
                st = index.stat()
            except OSError as exc:
                raise self._unwritable(exc) from None
            self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        self._names, self._default = names, default

    def _loadable(self, path: Path) -> Patch | None:
        """The patch in a registry file if it may be served: it reads, its digest is the one its name
        says, it is signed when keys are set, and it fits the model; else None (and why, logged)."""
        try:
            patch = read_patch(path)
            if path.name != f"{patch.digest.split(':', 1)[1]}{SUFFIX}":
                raise PatchError(f"holds patch {patch.digest}, not the one its name says")
            require_signed([patch], self._keys)
            self._check(patch)
        except ForgetpackError as exc:
            log.warning("%s: skipped (%s)", path, exc)
            return None
        return patch

    def _load_file(self, path: Path) -> Patch | None:
        """A registry file at start-up or from another replica; one that may not be served is skipped."""
        patch = self._loadable(path)
        if patch is not None:
            self._patches[patch.digest] = patch
        return patch
