"""Reading a bundle: the directory export hands to the runtime, verified before anything runs.

``manifest.json`` lists every artifact with its sha256 and size, the preprocessing and model config, the
prompt template, the image-token count, and which engines were built with which library versions.
Reading checks the schema, that every file is there, and that no byte changed; any failure names the
file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from .errors import BundleError
from .preprocess import PreprocessConfig

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ENCODER_FILES = ("vit.onnx", "aggregator.onnx", "fusion.onnx")


def sha256_of(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    root: str
    manifest: dict

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.manifest["preprocess"])

    @property
    def image_tokens(self) -> int:
        return int(self.manifest["model"]["image_tokens"])

    def llm_file(self, quant: str | None = None) -> str:
        llms = self.manifest["llm"]
        quant = quant or llms["default"]
        if quant not in llms["files"]:
            raise BundleError(f"bundle has no {quant} LLM; it has {', '.join(sorted(llms['files']))}")
        return self.path(llms["files"][quant])


def read_bundle(root: str, verify_hashes: bool = True) -> Bundle:
    """Open and verify a bundle; raise :class:`BundleError` with one line on the first problem."""
    mpath = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise BundleError(f"bundle not found: {root}")
    if not os.path.exists(mpath):
        raise BundleError(f"{root} is not a samf bundle (no {MANIFEST})")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise BundleError(f"{mpath}: unreadable manifest ({e})") from None
    if manifest.get("schema") != SCHEMA_VERSION:
        raise BundleError(f"{root}: manifest schema {manifest.get('schema')!r}, this runtime reads {SCHEMA_VERSION}")
    files = manifest.get("files", {})
    for name in ENCODER_FILES + tuple(manifest.get("llm", {}).get("files", {}).values()):
        if name not in files:
            raise BundleError(f"{root}: manifest does not list {name}")
    for name, meta in files.items():
        p = os.path.join(root, name)
        if not os.path.exists(p):
            raise BundleError(f"{root}: missing artifact {name}")
        size = os.path.getsize(p)
        if size != meta["size"]:
            raise BundleError(f"{root}: {name} is {size} bytes, manifest says {meta['size']} (altered or truncated)")
        if verify_hashes and sha256_of(p) != meta["sha256"]:
            raise BundleError(f"{root}: {name} does not match its sha256 in the manifest (altered)")
    return Bundle(root=root, manifest=manifest)
