"""The slim runtime: CT loading, preprocessing, bundle reading and the report pipeline.

Imports numpy, nibabel and the engine adapters only -- never torch, transformers or peft.
"""

from .errors import BundleError, EngineUnavailable, SamfError, ScanError

__all__ = ["SamfError", "ScanError", "BundleError", "EngineUnavailable"]
