"""What a bundle's ``manifest.json`` must hold, checked before anything in it is used.

Three checks, each failing with one line that names the key:

- **shape** (a JSON Schema, checked with ``jsonschema``): every key the runtime reads, with its type;
  artifact names are plain file names inside the bundle (no folders, no ``..``, no absolute paths);
  the preprocessing and prompt layout hold only the keys the code knows.
- **integrity**: ``integrity.manifest_sha256`` is the sha256 of the manifest's canonical JSON without that
  key, so an edit to the preprocessing, the prompt or a hash is caught like an edit to an artifact. (It
  guards against accidents and hand edits; against someone who rewrites the digest too, only a signature
  helps.)
- **compatibility**: the preprocessing, the encoders and the LLM fit together (image size, slice count,
  the fusion's width against the LLM's).
"""

from __future__ import annotations

import hashlib
import json

from samf.errors import BundleError

from ..scan.preprocess import SLAB_MODES

#: The exported encoder modules (the manifest lists each precision's file of each).
ENCODER_MODULES = ("vit", "aggregator", "fusion")
#: The precisions encoders come in: fp32 (the reference, always), fp16 (GPUs), int8 and bf16 (CPUs; bf16 is the
#: fp32 files run by OpenVINO in bf16, so it names a backend too).
ENCODER_PRECISIONS = ("fp32", "fp16", "int8", "bf16")
#: The encoder backends a precision may name (``encoders.<precision>.backend``; absent: onnxruntime).
ENCODER_FILE_BACKENDS = ("onnxruntime", "openvino")
#: A plain file name: no separator, not "." or "..", no control characters.
PLAIN_NAME = r"^(?!\.\.?$)[^/\\\x00-\x1f]{1,255}$"

_int = {"type": "integer"}
_num = {"type": "number"}
_ids = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_name = {"type": "string", "pattern": PLAIN_NAME}
#: One file per encoder module.
_modules = {"type": "object", "required": list(ENCODER_MODULES), "additionalProperties": False,
            "properties": {m: _name for m in ENCODER_MODULES}}

SCHEMA = {
    "type": "object",
    "required": ["schema", "model", "preprocess", "prompt", "llm", "encoders", "engines", "files", "integrity"],
    "properties": {
        "schema": _int,
        "model": {
            "type": "object", "required": ["image", "image_tokens", "llm"],
            "properties": {
                "image": {
                    "type": "object", "required": ["vit", "aggregator", "fusion"],
                    "properties": {
                        "vit": {"type": "object", "required": ["img_size", "in_chans"],
                                "properties": {"img_size": {"type": "integer", "minimum": 1},
                                               "in_chans": {"type": "integer", "minimum": 1}}},
                        "aggregator": {"type": "object", "required": ["n_slices", "n_tokens"],
                                       "properties": {"n_slices": {"type": "integer", "minimum": 1},
                                                      "n_tokens": {"type": "integer", "minimum": 1}}},
                        "fusion": {"type": "object", "required": ["d_llm"],
                                   "properties": {"d_llm": {"type": "integer", "minimum": 1}}},
                    },
                },
                "image_tokens": {"type": "integer", "minimum": 1},
                "llm": {"type": "object", "required": ["hidden_size"],
                        "properties": {"hidden_size": {"type": "integer", "minimum": 1}}},
            },
        },
        "preprocess": {
            "type": "object", "additionalProperties": False,
            "required": ["image_size", "pixel_spacing_mm", "slices_per_plane", "windows"],
            "properties": {
                "image_size": {"type": "integer", "minimum": 8, "maximum": 4096},
                "pixel_spacing_mm": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
                "slices_per_plane": {"type": "integer", "minimum": 1, "maximum": 512},
                "windows": {"type": "array", "minItems": 1, "items": {
                    "type": "array", "minItems": 2, "maxItems": 2, "prefixItems": [_num, {
                        "type": "number", "exclusiveMinimum": 0}]}},
                "body_threshold_hu": _num, "body_threshold_unit": _num,
                "min_extent_mm": {"type": "number", "minimum": 0},
                "slab": {"enum": list(SLAB_MODES)},
                "slab_samples": {"type": "integer", "minimum": 1, "maximum": 64},
            },
        },
        "prompt": {
            "type": "object", "required": ["layout"],
            "properties": {"layout": {
                "type": "object", "additionalProperties": False, "required": ["answer_end"],
                "properties": {"answer_end": {"type": "integer", "minimum": 0}, "stop": _ids,
                               "bos": {"type": ["integer", "null"], "minimum": 0}, "before_image": _ids,
                               "after_prompt": _ids, "prompt_format": {"type": "string", "pattern": "{request}"},
                               "pad": {"type": "integer", "minimum": 0}, "chat_template": {"type": "boolean"},
                               "notes": {"type": "object"}}}},
        },
        "llm": {
            "type": "object", "required": ["default", "files"],
            "properties": {
                "default": {"type": "string"},
                "files": {"type": "object", "minProperties": 1, "additionalProperties": _name},
                "token_embd": {"type": "object", "additionalProperties": {
                    "type": "object", "required": ["type", "shape", "offset"],
                    "properties": {"type": {"type": "string"}, "offset": {"type": "integer", "minimum": 0},
                                   "shape": {"type": "array", "minItems": 2, "maxItems": 2,
                                             "items": {"type": "integer", "minimum": 1}}}}},
            },
        },
        "encoders": {
            "type": "object", "required": ["fp32"], "propertyNames": {"enum": list(ENCODER_PRECISIONS)},
            "additionalProperties": {"type": "object", "required": ["files"], "properties": {
                "files": _modules, "backend": {"enum": list(ENCODER_FILE_BACKENDS)}}},
        },
        "io_signature": {"type": "object", "additionalProperties": False, "properties": {m: {
            "type": "object", "required": ["inputs", "outputs"],
            "additionalProperties": {"type": "object", "additionalProperties": {
                "type": "object", "required": ["dtype", "shape"],
                "properties": {"dtype": {"type": "string"}, "shape": {"type": "array", "items": {
                    "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "minLength": 1}]}}}}}}
            for m in ENCODER_MODULES}},
        "engines": {
            "type": "object",
            "properties": {"tensorrt": {"type": "array", "items": {
                "type": "object", "required": ["tensorrt", "plans"],
                "properties": {"plans": _modules, "precision": {"enum": list(ENCODER_PRECISIONS)}}}}},
        },
        "files": {
            "type": "object", "minProperties": 1,
            "propertyNames": {"pattern": PLAIN_NAME},
            "additionalProperties": {
                "type": "object", "required": ["sha256", "size"],
                "properties": {"sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                               "size": {"type": "integer", "minimum": 0}}},
        },
        "integrity": {"type": "object", "required": ["manifest_sha256"],
                      "properties": {"manifest_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}},
    },
}


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces), its ``integrity`` key left out."""
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                          .encode("utf-8")).hexdigest()


def seal(manifest: dict) -> dict:
    """Set ``integrity.manifest_sha256`` for the manifest as it now is (after the last edit to it)."""
    manifest["integrity"] = dict(manifest_sha256=manifest_digest(manifest))
    return manifest


def check_manifest(manifest: dict, root: str) -> None:
    """Shape, integrity and compatibility of a manifest (a JSON object) read from ``root``; :class:`BundleError`
    on the first problem."""
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(SCHEMA).iter_errors(manifest))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top)"
        raise BundleError(f"{root}: manifest key {where}: {error.message}"[:400])
    if manifest["integrity"]["manifest_sha256"] != manifest_digest(manifest):
        raise BundleError(f"{root}: manifest.json was changed after export (its integrity digest does not match)")
    check_compatibility(manifest, root)


def check_compatibility(m: dict, root: str) -> None:
    """The preprocessing, encoders and LLM of a manifest fit together."""
    image, pre = m["model"]["image"], m["preprocess"]
    problems = []
    if pre["image_size"] != image["vit"]["img_size"]:
        problems.append(f"preprocessing makes {pre['image_size']}² slices, the ViT takes {image['vit']['img_size']}²")
    if 3 * pre["slices_per_plane"] != image["aggregator"]["n_slices"]:
        problems.append(f"preprocessing makes {3 * pre['slices_per_plane']} slices, the aggregator takes "
                        f"{image['aggregator']['n_slices']}")
    if len(pre["windows"]) != image["vit"]["in_chans"]:
        problems.append(f"{len(pre['windows'])} HU windows, the ViT takes {image['vit']['in_chans']} channels")
    if image["fusion"]["d_llm"] != m["model"]["llm"]["hidden_size"]:
        problems.append(f"the fusion writes {image['fusion']['d_llm']}-wide rows, the LLM is "
                        f"{m['model']['llm']['hidden_size']} wide")
    if m["model"]["image_tokens"] != image["aggregator"]["n_tokens"]:
        problems.append(f"image_tokens {m['model']['image_tokens']} is not the aggregator's "
                        f"{image['aggregator']['n_tokens']}")
    if m["llm"]["default"] not in m["llm"]["files"]:
        problems.append(f"the default LLM {m['llm']['default']} is not among its files")
    named = (set(m["llm"]["files"].values())
             | {p for e in m["engines"].get("tensorrt", []) for p in e["plans"].values()}
             | {f for e in m["encoders"].values() for f in e["files"].values()})
    missing = sorted(n for n in named if n not in m["files"])
    if missing:
        problems.append(f"the manifest does not list {', '.join(missing)}")
    if problems:
        raise BundleError(f"{root}: the bundle does not fit together: {problems[0]}")
