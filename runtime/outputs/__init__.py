"""Outputs: what a reported scan becomes on disk or on the wire (the DICOM SR and PDF, the evidence images, the
slice PNGs), composed in one place that the batch and the service both call."""
