"""The one exception type a user sees: the CLI prints its message on one line and exits non-zero."""


def one_line(e: BaseException) -> str:
    """An error as one line for a row or a log: a SamfError's own message, anything else prefixed by its type."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if isinstance(e, SamfError) else f"{type(e).__name__}: {text}".rstrip(": ")


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
