"""ed25519 signatures for patches.

A signature covers the patch's content digest (which covers every tensor and all other
metadata), so signing adds two metadata keys and changes nothing else. Keys are PEM files:
a PKCS#8 private key and a SubjectPublicKeyInfo public key. The key id is the first 16 hex
digits of sha256 over the raw 32-byte public key.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from forgetpack.format.errors import SignatureError, one_line
from forgetpack.format.fileio import check_input_file, check_output_file, write_bytes_atomic
from forgetpack.format.patch import Patch, display_name

_CONTEXT = b"forgetpack.patch.signature.v1\n"


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: str | os.PathLike[str], public_path: str | os.PathLike[str],
                     replace: bool = False) -> str:
    """Write a new key pair; an existing key file is replaced only with ``replace`` (a lost private key
    cannot be made again). Returns the key id."""
    private_path = Path(private_path)
    check_output_file(private_path, "private key", replace=replace)
    check_output_file(public_path, "public key", replace=replace, inputs=[("the private key", private_path)])
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_bytes_atomic(private_path, pem, mode=0o600)  # never readable by others, not even for a moment
    write_bytes_atomic(public_path, pub)
    return key_id(key.public_key())


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not an unencrypted PEM private key ({_why_not(data, 'private', exc)})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    data = _read(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a PEM public key ({_why_not(data, 'public', exc)})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: not an ed25519 public key")
    return key


KeyLike = str | os.PathLike[str] | Ed25519PublicKey


def load_public_keys(keys: KeyLike | Sequence[KeyLike] | None) -> list[Ed25519PublicKey] | None:
    """The one way keys are given: a path, a loaded key, or a sequence of them.

    ``None`` means "no signature required". An empty sequence means "trust nobody": every
    patch is then refused, signed or not (an empty trust set never disables the checks).
    """
    if keys is None:
        return None
    if isinstance(keys, (str, os.PathLike, Ed25519PublicKey)):
        keys = [keys]
    out = []
    for k in keys:
        if isinstance(k, Ed25519PublicKey):
            out.append(k)
        elif isinstance(k, (str, os.PathLike)):
            out.append(load_public_key(k))
        else:
            raise SignatureError(f"trusted key {k!r} is neither a public key file nor an ed25519 public key")
    return out


def require_signed(patches: Sequence[Patch], keys: Sequence[Ed25519PublicKey] | None) -> None:
    """Raise unless every patch is signed by one of ``keys`` (nothing to check when ``keys`` is None)."""
    if keys is None:
        return
    for patch in patches:
        verify_signature(patch, list(keys))


_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


def _why_not(data: bytes, wanted: str, exc: BaseException) -> str:
    """Why a key file is not the ``wanted`` ("public"/"private") key, whole: the one wording for
    both loaders. The other half of a key pair is named as such; anything else quotes the parser
    in full, as one line (never cut at a fixed width)."""
    labels = {m.group(1).decode() for m in _PEM_LABEL.finditer(data)}
    other = "private" if wanted == "public" else "public"
    if any(label.endswith(f"{other.upper()} KEY") for label in labels):
        if wanted == "public":
            return "it is a private key; give the public key, the .pub file written next to it"
        return "it is a public key; signing needs the private key it was made from"
    return one_line(exc)


def _read(path: str | os.PathLike[str]) -> bytes:
    path = check_input_file(path, "key file", error=SignatureError)  # a FIFO or device would block the read
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read key ({exc.strerror})") from None


def sign(patch: Patch, private: Ed25519PrivateKey) -> Patch:
    """The same patch (same digest) with a signature over its digest."""
    signature = private.sign(_CONTEXT + patch.digest.encode())
    return replace(patch, signature=base64.b64encode(signature).decode(), key_id=key_id(private.public_key()))


def verify_signature(patch: Patch, keys: list[Ed25519PublicKey]) -> str:
    """Check the patch is signed by one of ``keys``; returns the key id that signed it."""
    where = display_name(patch)
    if not patch.signature:
        raise SignatureError(f"{where}: is not signed")
    by_id = {key_id(k): k for k in keys}
    key = by_id.get(patch.key_id or "")
    if key is None:
        raise SignatureError(f"{where}: signed by key {patch.key_id}, not by a trusted key ({', '.join(sorted(by_id)) or 'none trusted'})")
    try:
        key.verify(base64.b64decode(patch.signature, validate=True), _CONTEXT + patch.digest.encode())
    except (InvalidSignature, ValueError):
        raise SignatureError(f"{where}: signature does not verify with key {patch.key_id}") from None
    return patch.key_id or ""
