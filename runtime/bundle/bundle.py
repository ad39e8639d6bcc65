"""Reading a bundle: the directory export hands to the runtime, verified before anything runs.

``manifest.json`` lists every artifact with its sha256 and size, the preprocessing and model config, the
prompt template, the image-token count, and which engines were built with which library versions.
Reading checks the schema, that every file is there with its size, and that no byte changed in the
artifacts that will be loaded (the encoders and the one LLM chosen; not the other GGUFs). Hashes found
good are remembered by :mod:`samf.runtime.bundle.verified`, so an unchanged bundle is not re-hashed at every
start; ``samf-export verify`` re-hashes everything. Any failure names the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field

from samf.errors import BundleError

from ..atomic import atomic_file
from ..scan.preprocess import PreprocessConfig
from .manifest import ENCODER_PRECISIONS, check_manifest, seal
from .signature import SIGNATURE, check_signature
from .verified import VerifiedCache, stamp_of

SCHEMA_VERSION = 4  # 2: the prompt layout (token ids, end tokens) is the LLM's own, in the manifest;
#                    3: the manifest carries its own digest, and where each GGUF keeps its token embeddings;
#                    4: the encoders come in precisions (fp32, and fp16/int8 where they held their tolerance;
#                       bf16, added later, is the fp32 files on OpenVINO: an entry older bundles lack, not a 5)
MANIFEST_MAX_BYTES = 16 << 20
MANIFEST = "manifest.json"


def sha256_of(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return hash_fd(fd)
    finally:
        os.close(fd)


@dataclass
class OpenArtifact:
    """An artifact opened once, so that what is verified is what is loaded: engines are given
    ``/proc/self/fd/N``, the file this descriptor holds, whatever the bundle's path names by then."""

    name: str
    fd: int
    real_path: str

    @property
    def path(self) -> str:
        """Where an engine opens this very file: ``/proc/self/fd/N`` on Linux, else the bundle path."""
        proc = f"/proc/self/fd/{self.fd}"
        return proc if self.fd >= 0 and os.path.exists(proc) else self.real_path

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def hash_fd(fd: int, chunk: int = 1 << 22) -> str:
    """sha256 of the file open at ``fd``, read from its start (the descriptor's offset is left alone)."""
    h, offset = hashlib.sha256(), 0
    while True:
        block = os.pread(fd, chunk, offset)
        if not block:
            return h.hexdigest()
        h.update(block)
        offset += len(block)


@dataclass
class Bundle:
    root: str
    manifest: dict
    verified: set = field(default_factory=set)  # names hashed (or found in the cache) by this instance
    signed_by: str | None = None  # fingerprint of the trusted key whose signature was checked
    manifest_bytes: bytes = b""  # manifest.json as read and checked (what a signature covers)

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def open(self, name: str, verify: bool = True, use_cache: bool = True) -> OpenArtifact:
        """Open an artifact (a regular file, not a link) and check its sha256 against the manifest from the
        same descriptor the engine will load it through (:attr:`OpenArtifact.path`). Hashes found good are
        remembered (:mod:`samf.runtime.bundle.verified`); ``use_cache=False`` always hashes."""
        path = self.path(name)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise BundleError(f"{self.root}: cannot open {name} ({e.strerror})") from None
        art = OpenArtifact(name, fd, path)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(f"{self.root}: artifact {name} is not a regular file")
            stamp = stamp_of(st)
            want = self.manifest["files"][name]["sha256"]
            cache = VerifiedCache() if verify else None
            known = verify and use_cache and cache.known(path, want, stamp)
            if verify and not known:
                if hash_fd(fd) != want:
                    cache.forget(path)
                    cache.save()
                    raise BundleError(f"{self.root}: {name} does not match its sha256 in the manifest (altered)")
                cache.add(path, want, stamp, now=stamp_of(os.fstat(fd)))
                cache.save()
            if verify:
                self.verified.add(name)
            return art
        except BaseException:
            art.close()
            raise

    def verify(self, names, use_cache: bool = True) -> None:
        """Check each named artifact's sha256 against the manifest; skip those the cache knows unchanged."""
        for name in names:
            if use_cache and name in self.verified:
                continue
            self.open(name, use_cache=use_cache).close()

    def llm_quant(self, quant: str | None = None) -> str:
        """``quant``, or the manifest's default LLM type when None; refused when the bundle lacks it."""
        llms = self.manifest["llm"]
        quant = llms["default"] if quant is None else quant
        if quant not in llms["files"]:
            raise BundleError(f"bundle has no {quant or repr(quant)} LLM; it has {', '.join(sorted(llms['files']))}")
        return quant

    def llm_name(self, quant: str | None = None) -> str:
        """The file name of the LLM for ``quant`` (the manifest's default when None)."""
        return self.manifest["llm"]["files"][self.llm_quant(quant)]

    def token_embd(self, quant: str | None = None) -> dict | None:
        """Where the ``quant`` GGUF keeps its token embeddings, as the export recorded it (None: not recorded)."""
        return (self.manifest["llm"].get("token_embd") or {}).get(self.llm_quant(quant))

    def encoder_precisions(self) -> list:
        """The precisions the bundle's encoders come in, fp32 first."""
        return [p for p in ENCODER_PRECISIONS if p in self.manifest["encoders"]]

    def encoder_files(self, precision: str = "fp32") -> dict:
        """``{"vit": file, "aggregator": file, "fusion": file}`` of one precision."""
        return dict(self.manifest["encoders"][precision]["files"])

    def encoder_backend(self, precision: str) -> str:
        """The backend a precision's files are made for: ``openvino`` for bf16, else ``onnxruntime`` (whose files
        TensorRT plans are built from)."""
        return self.manifest["encoders"][precision].get("backend", "onnxruntime")

    def rejected_encoders(self) -> dict:
        """``{precision: why}`` for the variants the export made and dropped for missing their tolerance."""
        rejected = self.manifest.get("fidelity", {}).get("encoders_rejected", {})
        return {p: r.get("reason", "") for p, r in rejected.items() if isinstance(r, dict)}

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.manifest["preprocess"])

    @property
    def image_tokens(self) -> int:
        return int(self.manifest["model"]["image_tokens"])

    def llm_file(self, quant: str | None = None) -> str:
        return self.path(self.llm_name(quant))


def read_bundle(root: str, verify_hashes: bool = True, quant: str | None = None, trusted_keys=()) -> Bundle:
    """Open and verify a bundle; raise :class:`BundleError` with one line on the first problem.

    ``trusted_keys``: public key files; when given, the manifest must carry a signature by one of them
    (:mod:`samf.runtime.bundle.signature`).

    Every file must be there at its size; the fp32 encoders and the ``quant`` LLM (the default one when None)
    are hashed, or found unchanged since they last were."""
    mpath = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise BundleError(f"bundle not found: {root}")
    if not os.path.lexists(mpath):
        raise BundleError(f"{root} is not a samf bundle (no {MANIFEST})")
    try:  # non-blocking, so that a FIFO put in its place is refused instead of waited on
        fd = os.open(mpath, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MANIFEST_MAX_BYTES:
                raise BundleError(f"{mpath}: not a manifest (a regular file of at most "
                                  f"{MANIFEST_MAX_BYTES >> 20} MB)")
            raw = f.read(MANIFEST_MAX_BYTES + 1)
    except OSError as e:
        raise BundleError(f"{mpath}: unreadable manifest ({e.strerror})") from None
    # Checked on the very bytes that are parsed next, before anything else reads them.
    signed_by = check_signature(root, raw, trusted_keys) if trusted_keys else None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        detail = "nested too deep" if isinstance(e, RecursionError) else e
        raise BundleError(f"{mpath}: unreadable manifest ({detail})".splitlines()[0]) from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{root}: the manifest is a JSON {type(manifest).__name__}, not an object")
    if manifest.get("schema") != SCHEMA_VERSION:
        raise BundleError(f"{root}: manifest schema {manifest.get('schema')!r}, this runtime reads {SCHEMA_VERSION} "
                          "(rebuild the bundle with this version's samf-export bundle)")
    check_manifest(manifest, root)
    files = manifest["files"]
    for name, meta in files.items():
        p = os.path.join(root, name)
        if not os.path.lexists(p):
            raise BundleError(f"{root}: missing artifact {name}")
        st = os.lstat(p)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{root}: artifact {name} is not a regular file")
        if st.st_size != meta["size"]:
            raise BundleError(f"{root}: {name} is {st.st_size} bytes, manifest says {meta['size']} "
                              "(altered or truncated)")
    bundle = Bundle(root=root, manifest=manifest, signed_by=signed_by, manifest_bytes=raw)
    if verify_hashes:
        bundle.verify([*bundle.encoder_files("fp32").values(), bundle.llm_name(quant)])
    return bundle


def verify_all(bundle: Bundle) -> list:
    """Re-hash every artifact of a bundle read with :func:`read_bundle`, ignoring the cache:
    ``[(name, size, problem or None)]``; refreshes the cache."""
    out = []
    for name, meta in sorted(bundle.manifest["files"].items()):
        try:
            bundle.verify([name], use_cache=False)
            out.append((name, meta["size"], None))
        except BundleError:
            out.append((name, meta["size"], "does not match its sha256"))
    return out


def update_manifest(bundle_dir: str, update) -> dict:
    """Apply ``update(manifest)``, which may add files with an empty entry (``files[name] = {}``); those are
    hashed, and every file already listed must still match its hash (a changed one is refused, never
    re-blessed). The manifest is replaced atomically; a signature it had no longer holds and is removed."""
    bundle = read_bundle(bundle_dir, verify_hashes=False)
    manifest = bundle.manifest
    update(manifest)
    bundle.verify([name for name, meta in manifest["files"].items() if meta], use_cache=False)  # re-hashed
    for name, meta in manifest["files"].items():
        if not meta:
            p = os.path.join(bundle_dir, name)
            manifest["files"][name] = dict(sha256=sha256_of(p), size=os.path.getsize(p))
    with atomic_file(os.path.join(bundle_dir, MANIFEST)) as f:
        json.dump(seal(manifest), f, indent=2)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(bundle_dir, SIGNATURE))
    return manifest
