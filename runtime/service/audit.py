"""The service's audit trail and its named tokens: who did what, kept apart from the log.

The trail is an append-only JSON-lines file (``WORK/audit.jsonl`` unless ``--audit-log``): one record per job
event -- ``received``, ``started``, ``done``, ``failed``, ``delivered``, ``undelivered``, ``requeued`` -- with the
time (UTC), who (a token's name, ``dicom:<calling AE title>``, or ``local`` where no token is asked for), the job
(id, kind), the scan's SHA-256, the bundle (manifest digest, LLM file, encoders), the outcome and the duration.
It holds no patient name, no DICOM UID, no path and no report text: a scan is named by the hash of its bytes,
which a site can match against its own copy and nobody can read a patient from.

Each record is written with one ``write`` on a file opened ``O_APPEND`` and flushed to disk (``fsync``): lines
from several threads never interleave, and a record the service said it wrote survives a power cut.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time

from samf.errors import SamfError

log = logging.getLogger("samf.service")

EVENTS = ("received", "started", "done", "failed", "delivered", "undelivered", "requeued")


def scan_sha256(path: str) -> str:
    """SHA-256 of a scan file, or of a series folder: each file's digest in the order of their names, hashed
    together (the names are the service's own, never the sender's)."""
    if os.path.isdir(path):
        outer = hashlib.sha256()
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if os.path.isfile(full):
                outer.update(bytes.fromhex(scan_sha256(full)))
        return outer.hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def bundle_record(identity: dict) -> dict:
    """What the trail says of the bundle: its manifest digest and engines (not its path)."""
    return {k: identity.get(k) for k in ("bundle_sha256", "llm", "encoders", "encoder_precision", "signed_by")}


class AuditTrail:
    """Appends one JSON line per event to ``path`` (its folder made; the file created mode 0640)."""

    def __init__(self, path: str, bundle: dict):
        self.path, self.bundle = path, bundle
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as e:
            raise SamfError(f"--audit-log {path}: {e.strerror or e}") from None
        self._lock = threading.Lock()

    def record(self, event: str, job_id: str, kind: str, who: str | None = None, scan_sha256: str | None = None,
               outcome: str | None = None, duration_s: float | None = None, **extra) -> None:
        assert event in EVENTS, event
        rec = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1000):03d}Z",
                   event=event, who=who, job=job_id, kind=kind, scan_sha256=scan_sha256, bundle=self.bundle,
                   outcome=outcome or event)
        if duration_s is not None:
            rec["duration_s"] = round(duration_s, 3)
        rec.update(extra)
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        with self._lock:
            try:
                os.write(self._fd, line)
                os.fsync(self._fd)
            except OSError as e:  # the job goes on; the log says the trail has a gap
                log.error("audit trail %s not written: %s", self.path, e.strerror or e)

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)


class NullTrail:
    """No trail (helpers and tests that run a :class:`JobRunner` alone)."""

    def record(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------ tokens

def parse_tokens(text: str, source: str) -> dict:
    """``{token: name}`` from a token file: a JSON object ``{"name": "token", ...}`` or lines ``NAME TOKEN``
    (``#`` comments and blank lines skipped)."""
    pairs = []
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise SamfError(f"{source}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
            raise SamfError(f"{source}: expected a JSON object of name: token strings")
        pairs = list(obj.items())
    else:
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise SamfError(f"{source}, line {n}: expected 'NAME TOKEN'")
            pairs.append((parts[0], parts[1]))
    out: dict = {}
    for name, token in pairs:
        if len(token) < 8:
            raise SamfError(f"{source}: the token of {name!r} is shorter than 8 characters")
        if token in out:
            raise SamfError(f"{source}: {name!r} and {out[token]!r} share a token")
        out[token] = name
    return out


class Tokens:
    """The bearer tokens the service accepts, by name: ``--token`` (named ``token``) and ``--token-file``,
    which is read again on :meth:`reload` (SIGHUP) and whenever its modification time or size changes, so a
    token added, rotated or revoked takes effect on the next request. A file that cannot be read or parsed on
    a reload keeps the tokens in force and logs one line."""

    def __init__(self, token: str | None = None, token_file: str | None = None):
        self.fixed = {token: "token"} if token else {}
        self.file, self._stamp, self._lock = token_file, None, threading.Lock()
        self._from_file: dict = {}
        if token_file is not None:
            self._load(strict=True)

    @property
    def required(self) -> bool:
        return bool(self.fixed) or self.file is not None

    def _stat(self):
        st = os.stat(self.file)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self, strict: bool) -> None:
        stamp = None
        try:
            stamp = self._stat()
            with open(self.file, encoding="utf-8") as f:
                tokens = parse_tokens(f.read(), self.file)
        except FileNotFoundError as e:
            if strict:
                raise SamfError(f"--token-file {self.file}: {e.strerror}") from None
            with self._lock:  # the file removed: its tokens are revoked
                self._from_file, self._stamp = {}, None
            log.warning("token file gone: only --token is accepted now")
            return
        except (OSError, SamfError, UnicodeDecodeError) as e:
            if strict:
                raise SamfError(str(e) if isinstance(e, SamfError) else
                                f"--token-file {self.file}: {getattr(e, 'strerror', None) or e}") from None
            self._stamp = stamp  # not read again until it changes
            log.error("token file not reloaded, the previous tokens stay: %s",
                      e if isinstance(e, SamfError) else type(e).__name__)
            return
        with self._lock:
            self._from_file, self._stamp = tokens, stamp
        if not strict:
            log.info("token file reloaded: %d token(s)", len(tokens))

    def reload(self) -> None:
        if self.file is not None:
            self._load(strict=False)

    def _fresh(self) -> None:
        if self.file is None:
            return
        try:
            stamp = self._stat()
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._load(strict=False)

    def who(self, given: str) -> str | None:
        """The name of the token ``given``, or None. Every known token is compared, in constant time each."""
        self._fresh()
        with self._lock:
            known = {**self._from_file, **self.fixed}
        found = None
        for token, name in known.items():
            if hmac.compare_digest(given.encode(), token.encode()):
                found = name
        return found
