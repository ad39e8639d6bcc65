"""The service's knobs, each with its one default: :class:`ServiceConfig`. ``samf serve``'s options, and the keys of
its ``--config`` TOML file, are made from its fields (``cli/serve_cli.py``), and so are those ``samf doctor`` shares
with it; the pipeline's own knobs (``--parallel``, ``--max-tokens``, the engines) are
:class:`~samf.runtime.inference.pipeline.PipelineConfig`'s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..options import option

#: The audit trail's file in the work folder, where ``--audit-log`` does not say otherwise.
AUDIT_FILE = "audit.jsonl"


def default_service_dir() -> str:
    """``$XDG_STATE_HOME/samf/service`` (``~/.local/state/samf/service`` where it is not set)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "samf", "service")


@dataclass
class ServiceConfig:
    """How ``samf serve`` runs besides the pipeline: where it listens and who may ask, its work folder and limits,
    DICOM in and out. A field made with :func:`~samf.runtime.options.option` is also serve's option. ``work`` and
    ``audit_log`` left None are filled in from the environment and the work folder."""

    host: str = option("127.0.0.1", "address to bind; any other than this machine's needs --token or --token-file")
    port: int = option(8080, "the HTTP port", min=0, max=65535)
    token: str | None = option(None, "bearer token every request must carry (default: $SAMF_TOKEN; named 'token' in "
                                     "the audit trail)", type=str, envvar="SAMF_TOKEN")
    token_file: str | None = option(None, "named tokens, one 'NAME TOKEN' a line (or a JSON object NAME: TOKEN); "
                                          "reread on SIGHUP and when the file changes, so a rotated or revoked token "
                                          "takes effect without a restart", path="file")
    tls_cert: str | None = option(None, "serve HTTPS with this certificate (PEM; with --tls-key)", path="file")
    tls_key: str | None = option(None, "the --tls-cert's private key", path="file")
    work: str | None = option(None, "the job queue (SQLite) and uploaded scans", path="dir",
                              shown="$XDG_STATE_HOME/samf/service")
    audit_log: str | None = option(None, "the audit trail: one JSON line per job event (who, what, outcome; no "
                                         "identifiers)", path="file", shown=f"WORK/{AUDIT_FILE}")
    input_dirs: tuple = option((), "a folder whose scans may be given by path; repeatable (default: uploads only)",
                               name="--input-dir", multiple=True, path="dir")
    max_upload_mb: int = option(2048, "the largest upload accepted, in MB; larger ones get 413", min=1)
    max_queue: int = option(256, "queued and running jobs accepted; more get 429", min=0)
    stop_timeout: float = option(60.0, "on SIGTERM, seconds to let running reports finish; those still running are "
                                       "requeued and run at the next start", min=0)
    dicom_port: int | None = option(None, "also receive CT series over DICOM (C-STORE SCP, C-ECHO) on this port",
                                    type=int, min=1, max=65535)
    ae_title: str = option("SAMF", "this service's DICOM AE title")
    dicom_dest: str | None = option(None, "AE@HOST:PORT the SR and PDF of a DICOM-received series are sent to "
                                          "(C-STORE); default: written under WORK/dicom-out/<job id>/", type=str)
    series_settle: float = option(10.0, "seconds without a new image after which a received series is complete",
                                  min=0.1)
    series_timeout: float = option(3600.0, "seconds after its first image a series still arriving is dropped (its "
                                           "files removed)", min=1)
    dicom_allow: tuple = option((), "a calling AE title allowed to send (repeatable; others are rejected at "
                                    "association); required when --host is not this machine", multiple=True)
    dicom_retries: int = option(4, "times a refused or failed C-STORE of the SR and PDF is retried (backoff doubling "
                                   "from --dicom-retry-wait) before the job is marked undelivered", min=0, max=20)
    dicom_retry_wait: float = option(2.0, "seconds before the first retry", min=0)
    dicom_tls_cert: str | None = option(None, "DICOM over TLS: this service's certificate (PEM), for its SCP and its "
                                              "C-STOREs", path="file")
    dicom_tls_key: str | None = option(None, "the --dicom-tls-cert's private key", path="file")
    dicom_tls_ca: str | None = option(None, "CA certificates (PEM) that peers' certificates must chain to: senders "
                                            "must then present one, and --dicom-dest's is checked against them",
                                      path="file")

    def __post_init__(self):
        self.input_dirs, self.dicom_allow = tuple(self.input_dirs), tuple(self.dicom_allow)
        if self.work is None:
            self.work = default_service_dir()
        if self.audit_log is None:
            self.audit_log = os.path.join(self.work, AUDIT_FILE)

    @property
    def max_upload(self) -> int:
        """The upload limit in bytes."""
        return self.max_upload_mb << 20
