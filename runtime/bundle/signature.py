"""Who built a bundle: an Ed25519 signature over ``manifest.json``'s exact bytes, kept beside it in
``manifest.sig``.

The manifest holds the sha256 of every artifact and its own digest, so signing its bytes vouches for the
whole bundle. ``samf-export sign --key K`` writes the signature; ``--trusted-key P`` on the runtime's
commands refuses a bundle that is unsigned, or signed by any other key, before anything in it is used.
Keys are ordinary Ed25519 keys, in PEM (``openssl genpkey -algorithm ed25519``) or OpenSSH form
(``ssh-keygen -t ed25519``), read with ``cryptography``. A changed manifest (``samf-export build-engines``)
drops the signature, which must then be made again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat

from samf.errors import BundleError, SamfError

from ..atomic import atomic_file

SIGNATURE = "manifest.sig"
SIGNATURE_MAX_BYTES = 4096
#: Signed before the manifest's bytes, so that a signature made for something else never verifies here.
DOMAIN = b"samf bundle manifest v1\x00"
KEY_MAX_BYTES = 64 << 10


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SamfError("bundle signatures need the 'cryptography' package (pip install cryptography)") from None
    return serialization, ed25519, InvalidSignature, UnsupportedAlgorithm


def _read_key_file(path: str, what: str) -> bytes:
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > KEY_MAX_BYTES:
            raise SamfError(f"{what} {path!r} is not a key file")
        with open(path, "rb") as f:
            return f.read(KEY_MAX_BYTES)
    except OSError as e:
        raise SamfError(f"cannot read {what} {path!r} ({e.strerror})") from None


def load_public_key(path: str):
    """An Ed25519 public key from a PEM or OpenSSH (``ssh-ed25519 ...``) file."""
    serialization, ed25519, _, unsupported = _crypto()
    data = _read_key_file(path, "trusted key")
    try:
        key = (serialization.load_ssh_public_key(data) if data.lstrip().startswith(b"ssh-")
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError, unsupported):
        raise SamfError(f"trusted key {path!r} is not a PEM or OpenSSH public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SamfError(f"trusted key {path!r} is not an Ed25519 key")
    return key


def load_private_key(path: str):
    """An Ed25519 private key from a PEM or OpenSSH file; an encrypted one takes its passphrase from
    ``SAMF_KEY_PASSPHRASE``."""
    serialization, ed25519, _, unsupported = _crypto()
    data = _read_key_file(path, "signing key")
    secret = os.environ.get("SAMF_KEY_PASSPHRASE")
    password = secret.encode() if secret else None
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=password)
        else:
            key = serialization.load_pem_private_key(data, password=password)
    except TypeError:
        raise SamfError(f"signing key {path!r} is encrypted: give its passphrase in SAMF_KEY_PASSPHRASE") from None
    except (ValueError, unsupported):
        raise SamfError(f"signing key {path!r} is not a PEM or OpenSSH private key (or the passphrase is wrong)"
                        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SamfError(f"signing key {path!r} is not an Ed25519 key")
    return key


def fingerprint(public_key) -> str:
    """``sha256:`` and the first 32 hex digits of the sha256 of the raw 32-byte public key."""
    serialization = _crypto()[0]
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:32]


def write_keypair(private_path: str) -> tuple[str, str]:
    """A new Ed25519 key pair: ``private_path`` (PEM, mode 0600) and ``private_path + '.pub'`` (PEM).
    Refuses to overwrite either. Returns (public key path, fingerprint)."""
    serialization, ed25519 = _crypto()[:2]
    public_path = private_path + ".pub"
    for p in (private_path, public_path):
        if os.path.lexists(p):
            raise SamfError(f"{p!r} exists; not overwriting a key")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    with atomic_file(public_path, "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return public_path, fingerprint(key.public_key())


def sign_manifest(root: str, manifest_bytes: bytes, private_key_path: str) -> str:
    """Write ``root/manifest.sig`` for these manifest bytes (as read and checked by the caller); return the
    key's fingerprint."""
    key = load_private_key(private_key_path)
    sig = key.sign(DOMAIN + manifest_bytes)
    record = dict(algorithm="ed25519", key=fingerprint(key.public_key()),
                  signature=base64.b64encode(sig).decode("ascii"))
    with atomic_file(os.path.join(root, SIGNATURE)) as f:
        json.dump(record, f, indent=2)
    return record["key"]


def read_signature(root: str) -> dict | None:
    """The bundle's signature record, or None when it has none; :class:`BundleError` when it is malformed."""
    path = os.path.join(root, SIGNATURE)
    if not os.path.lexists(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise BundleError(f"{root}: cannot open {SIGNATURE} ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleError(f"{root}: {SIGNATURE} is not a regular file")
        raw = f.read(SIGNATURE_MAX_BYTES + 1)
    try:
        record = json.loads(raw) if len(raw) <= SIGNATURE_MAX_BYTES else None
        ok = (isinstance(record, dict) and record.get("algorithm") == "ed25519"
              and isinstance(record.get("signature"), str))
        sig = base64.b64decode(record["signature"], validate=True) if ok else b""
    except ValueError:
        ok = False
    if not ok or len(sig) != 64:
        raise BundleError(f"{root}: {SIGNATURE} is not a samf Ed25519 signature record")
    return dict(record, raw_signature=sig)


def check_signature(root: str, manifest_bytes: bytes, trusted_keys) -> str:
    """The fingerprint of the trusted key (``trusted_keys``: key file paths) that signed these manifest
    bytes; :class:`BundleError` when the bundle is unsigned or no trusted key verifies its signature."""
    InvalidSignature = _crypto()[2]
    keys = [load_public_key(p) for p in trusted_keys]
    record = read_signature(root)
    if record is None:
        raise BundleError(f"{root}: the bundle is not signed ({SIGNATURE} missing) and a trusted key is required")
    for key in keys:
        try:
            key.verify(record["raw_signature"], DOMAIN + manifest_bytes)
            return fingerprint(key)
        except InvalidSignature:
            continue
    who = record.get("key") if isinstance(record.get("key"), str) else "an unknown key"
    raise BundleError(f"{root}: the manifest's signature does not verify with the trusted key"
                      f"{'s' if len(keys) > 1 else ''} (signed by {who[:48]!r}, or changed after signing)")
