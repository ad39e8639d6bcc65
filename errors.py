"""The one exception type a user sees: the CLI prints its message on one line and exits non-zero."""


class SamfError(Exception):
    """A problem with the user's input or environment (bad scan, broken bundle, missing engine)."""


class ScanError(SamfError):
    """A scan that cannot be read or is not a usable CT."""


class BundleError(SamfError):
    """A bundle that is missing, incomplete, altered, or built for something else."""


class ExportCheckFailed(SamfError):
    """An exported artifact that does not match its source (ONNX vs PyTorch, GGUF vs checkpoint, quantized vs
    unquantized): the export stops and nothing is written at its destination."""


class EngineUnavailable(SamfError):
    """An inference engine whose library is not installed or cannot run here."""


class PeerRankFailed(Exception):
    """Under torchrun: this rank stopped because another rank died mid-collective. Not a SamfError: the error
    itself is the failing rank's to report, once; this rank only says that it stopped."""
