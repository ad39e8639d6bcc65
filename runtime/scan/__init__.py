"""Scan I/O: a CT scan read (NIfTI, DICOM series, .npy, CT-RATE) into the canonical frame, checked, and cut into
the slices the model reads (the preprocessing training reuses)."""
