"""samf: CT-scan report generation with Slice-Attentive Multimodal Fusion, from training to a slim runtime."""

__version__ = "0.1.0"
