"""samf: CT-scan report generation with Slice-Attentive Multimodal Fusion, from training to a slim runtime."""

import os as _os

__version__ = "0.1.0"

# A hospital workstation must not talk to anyone. Telemetry is switched off here, before any library that has
# it can load: ONNX Runtime 1.32 reads ORT_DISABLE_TELEMETRY when it loads (ORT_TELEMETRY_DISABLED does
# nothing); huggingface_hub reads HF_HUB_DISABLE_TELEMETRY. A value the user set is left as it is.
for _name in ("ORT_DISABLE_TELEMETRY", "HF_HUB_DISABLE_TELEMETRY"):
    _os.environ.setdefault(_name, "1")
