"""The patch registry: the patches a server may apply, on a folder that replicas can share.

Ids are digests (``sha256:…``) or registered names (letters, digits, ``._-``), never file paths:
a request cannot make the server open a file of its choosing. The folder holds each patch as
``<hex digest>.fpatch.safetensors`` (the bytes as uploaded, signature included) and
``registry.json`` (names and the default set); every write goes aside and is renamed into place,
so a reader (another replica) sees the old registry or the new one, never half of one. Readers
re-read ``registry.json`` when its stat changes: a switch on one replica reaches the others.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from forgetpack.format.errors import ForgetpackError, PatchError
from forgetpack.format.fileio import write_bytes_atomic
from forgetpack.format.patch import MAX_PATCH_BYTES, Patch, describe, read_patch
from forgetpack.format.signing import require_signed

INDEX = "registry.json"
SUFFIX = ".fpatch.safetensors"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


class UnknownPatch(ForgetpackError):
    """An id that names no registered patch (HTTP 404 on its own route, 422 inside a request)."""


class PatchInUse(ForgetpackError):
    """Deleting a patch that the default set uses (HTTP 409)."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or DIGEST_RE.fullmatch(name):
        raise ForgetpackError(f"patch name {str(name)[:70]!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


class PatchRegistry:
    """Patches by digest, names, and the default set; thread-safe, persisted when given a folder."""

    def __init__(self, folder: str | os.PathLike[str] | None, check: Callable[[Patch], None],
                 trusted_keys: Sequence[Any] | None = None):
        self.folder = Path(folder) if folder is not None else None
        self._check = check  # raises unless the patch fits the served model's base
        self._keys = trusted_keys
        self._lock = threading.Lock()
        self._patches: dict[str, Patch] = {}
        self._names: dict[str, str] = {}
        self._default: tuple[str, ...] = ()
        self._stamp: tuple[int, int, int] | None = None
        if self.folder is not None:
            if self.folder.exists() and not self.folder.is_dir():
                raise ForgetpackError(f"{self.folder}: is not a folder (the patch registry is a folder)")
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
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        with self._lock:
            try:
                data = json.loads(index.read_text(encoding="utf-8"))
                names, default = dict(data["names"]), tuple(data["default"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ForgetpackError(f"{index}: unreadable registry index ({exc})") from None
            self._names, self._default, self._stamp = names, default, stamp

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
        where = self.folder if self.folder is not None else None
        fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".tmp", dir=where)  # never matched by the *SUFFIX scan
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            try:
                patch = dataclasses.replace(read_patch(tmp), source=None)  # named by digest, never by the temp path
                return self._register(patch, Path(tmp), name)
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
        with self._lock:
            if self.folder is not None:
                target = self.folder / f"{digest.split(':', 1)[1]}{SUFFIX}"
                if not target.exists():
                    write_bytes_atomic(target, path.read_bytes())
            self._patches[digest] = patch
            if name is not None:
                self._write({**self._names, name: digest}, self._default)
        return patch

    def remove(self, pid: str) -> Patch:
        (digest,) = self.digests([pid])
        patch = self.get(digest)
        with self._lock:
            if digest in self._default:
                raise PatchInUse(f"{pid[:70]!r}: is in the default patch set; switch the default first (PUT /v1/default-patches)")
            self._write({n: d for n, d in self._names.items() if d != digest}, self._default)
            self._patches.pop(digest, None)
            if self.folder is not None:
                (self.folder / f"{digest.split(':', 1)[1]}{SUFFIX}").unlink(missing_ok=True)
        return patch

    def set_default(self, digests: Sequence[str]) -> tuple[str, ...]:
        """Make the patches with ``digests`` (already checked as a set) the default, in one step."""
        with self._lock:
            self._write(self._names, tuple(digests))
        return self._default

    def _write(self, names: dict[str, str], default: tuple[str, ...]) -> None:
        """Persist first, then switch memory: a failed write leaves both as they were (lock held)."""
        if self.folder is not None:
            index = self.folder / INDEX
            write_bytes_atomic(index, json.dumps({"version": 1, "names": names, "default": list(default)}, indent=1).encode())
            st = index.stat()
            self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        self._names, self._default = names, default

    def _load_file(self, path: Path) -> Patch | None:
        """A registry file at start-up or from another replica; one that no longer fits is skipped."""
        try:
            patch = read_patch(path)
            require_signed([patch], self._keys)
            self._check(patch)
        except ForgetpackError as exc:
            logging.getLogger("runtime.serve").warning("%s: skipped (%s)", path, exc)
            return None
        self._patches[patch.digest] = patch
        return patch
