"""The slim runtime: CT loading (NIfTI, DICOM, .npy, CT-RATE), preprocessing, bundle reading, the pipeline.

Imports numpy, nibabel, pydicom (and Pillow for `samf slices`) and the engine adapters only -- never
torch, transformers or peft.
"""

from samf.errors import BundleError, EngineUnavailable, SamfError, ScanError

__all__ = ["SamfError", "ScanError", "BundleError", "EngineUnavailable"]
