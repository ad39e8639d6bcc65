"""``samf serve`` run: the bundle loaded once, the job queue recovered, the HTTP app (:mod:`.app`) served by uvicorn,
and, when asked, DICOM series received (:mod:`.dicom_net`), until SIGTERM.

Safety: binds 127.0.0.1 unless told otherwise, and refuses any other address without a bearer token (and DICOM
off this machine without the senders' AE titles).

Stopping: SIGTERM (or SIGINT) makes ``/readyz`` answer 503, stops the DICOM listener, lets uvicorn finish the
requests in flight, then lets the worker finish the reports it has begun (``--stop-timeout``); jobs claimed but not
begun go back to the queue, and any still running at the deadline are requeued by the next start. SIGHUP rereads
the token file.
"""

from __future__ import annotations

import logging
import os
import signal

from samf.errors import SamfError

from .app import ServiceConfig, create_app, is_loopback
from .audit import Tokens
from .jobs import JobRunner, JobStore


def serve(bundle: str, host: str, port: int, work: str, *, token: str | None = None, token_file: str | None = None,
          input_dirs: tuple = (), max_upload_mb: int = 2048, max_queue: int = 256, parallel: int = 4,
          max_tokens: int = 256, engines: dict | None = None, dicom: dict | None = None, audit_log: str | None = None,
          stop_timeout: float = 60.0, tls: dict | None = None) -> None:
    """Load the bundle, recover the queue, serve until SIGTERM/SIGINT. ``dicom``: ``port``, ``ae_title``,
    ``dest`` (AE@HOST:PORT) or ``out_dir``, ``settle_s``, ``timeout_s``, ``allow`` (calling AE titles; required
    off this machine), ``retries``, ``retry_wait``, ``tls`` (``cert``, ``key``, ``ca``), to receive series over
    DICOM as well. ``tls``: ``cert`` and ``key`` for HTTPS."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise SamfError("samf serve needs the service's libraries: pip install 'samf[serve]'") from None

    from ..inference.pipeline import ReportPipeline
    from .audit import AuditTrail, bundle_record

    tokens = Tokens(token, token_file)
    if not is_loopback(host) and not tokens.required:
        raise SamfError(f"binding {host} (not this machine only) needs a bearer token: --token, SAMF_TOKEN or "
                        "--token-file")
    if dicom and not is_loopback(host) and not dicom.get("allow"):
        raise SamfError(f"receiving DICOM on {host} (not this machine only) needs the senders' AE titles: "
                        "--dicom-allow AE (repeatable)")
    dicom_tls = (None, None)
    if dicom:
        from .dicom_net import check_ae_title, tls_contexts

        for title in (dicom["ae_title"], *dicom.get("allow", ())):
            check_ae_title(title, "AE title")
        if dicom.get("tls"):
            dicom_tls = tls_contexts(dicom["tls"]["cert"], dicom["tls"]["key"], dicom["tls"].get("ca"))
    if tls:
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls["cert"], tls["key"])
        except (OSError, ssl.SSLError) as e:
            raise SamfError(f"--tls-cert/--tls-key ({tls['cert']}, {tls['key']}): "
                            f"{getattr(e, 'strerror', None) or e}") from None
    for d in input_dirs:
        if not os.path.isdir(d):
            raise SamfError(f"--input-dir {d}: not a folder")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines name peers and instances
    os.makedirs(work, exist_ok=True)
    store = JobStore(work)
    requeued = store.recover()
    if dicom and dicom.get("dest"):
        from .dicom_net import parse_destination

        parse_destination(dicom["dest"])  # refused before the bundle loads
    pipe = ReportPipeline(bundle, parallel=parallel, max_new_tokens=max_tokens, **(engines or {}))
    audit = AuditTrail(audit_log or os.path.join(work, "audit.jsonl"), bundle_record(pipe.identity))
    for job in requeued:
        audit.record("requeued", job.id, job.kind, who=job.params.get("who"), scan_sha256=job.params.get("sha256"),
                     outcome="running when the service last stopped: queued again")
    reply = scp = collector = None
    if dicom:
        from .dicom_net import DicomReply, SeriesCollector, queue_series, start_scp

        reply = DicomReply(pipe, dicom.get("dest"), dicom.get("out_dir") or os.path.join(work, "dicom-out"),
                           dicom["ae_title"], results_dir=store.results, retries=dicom.get("retries", 4),
                           retry_wait=dicom.get("retry_wait", 2.0), ssl_context=dicom_tls[1])
    runner = JobRunner(store, pipe, batch=max(4 * parallel, 8), reply=reply, audit=audit)
    cfg = ServiceConfig(tokens, max_upload_mb, max_queue, input_dirs, max_tokens, pipe.identity, audit)
    app = create_app(store, runner, cfg)
    runner.start()
    log = logging.getLogger("samf.service")
    if dicom:
        collector = SeriesCollector(os.path.join(work, "dicom-in"), dicom["settle_s"],
                                    queue_series(store, max_tokens, runner.wake.set, audit),
                                    dicom.get("timeout_s", 3600.0))
        collector.start()
        scp = start_scp(dicom["ae_title"], host, dicom["port"], collector, tuple(dicom.get("allow", ())),
                        ssl_context=dicom_tls[0])
        log.info("DICOM: %s listening on %s:%d%s, results to %s", dicom["ae_title"], host, dicom["port"],
                 " (TLS)" if dicom_tls[0] else "", dicom.get("dest") or "a folder")

    def stopping() -> None:
        """The first thing a stop does, in the signal handler: no new job is taken or begun."""
        if cfg.ready.is_set():
            cfg.ready.clear()
            runner.stop()
            if reply is not None:
                reply.interrupt.set()
            log.info("stopping: no new job is begun; %d running", len(runner.running()))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            stopping()
            super().handle_exit(sig, frame)

    # uvicorn re-raises the signal that stopped it once it has restored the handlers it found: let it find these
    # (which do nothing), so the process ends here, after the jobs, and not by that signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    signal.signal(signal.SIGHUP, lambda *_: tokens.reload())
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=max(1, int(stop_timeout)),
                            ssl_certfile=tls and tls["cert"], ssl_keyfile=tls and tls["key"])
    log.info("serving %s on %s://%s:%d (%d job(s) resumed)", pipe.identity.get("llm"), "https" if tls else "http",
             host, port, len(requeued))
    try:
        Server(config).run()
    finally:
        stopping()
        if scp is not None:
            scp.shutdown()
            collector.stop()
        runner.join(timeout=stop_timeout)
        if runner.is_alive():  # the next start requeues them (JobStore.recover)
            log.warning("stopped with %d job(s) still running after %.0f s: they run again at the next start",
                        len(runner.running()), stop_timeout)
        else:
            pipe.close()
            audit.close()
            store.close()
            log.info("stopped: every begun job ended")
