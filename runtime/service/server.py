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

import asyncio
import logging
import os
import signal
import threading

from samf.errors import SamfError

from ..inference.pipeline import PipelineConfig
from .app import create_app, is_loopback
from .audit import Tokens
from .config import ServiceConfig
from .jobs import JobRunner, JobStore


def serve(bundle: str, cfg: ServiceConfig | None = None, pipeline: PipelineConfig | None = None) -> None:
    """Load the bundle with ``pipeline`` (its ``parallel``, ``max_new_tokens`` and engines), recover the queue,
    serve as ``cfg`` says (:class:`ServiceConfig`: HTTP, with TLS where it names a certificate; DICOM as well
    where it names ``dicom_port``) until SIGTERM/SIGINT."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise SamfError("samf serve needs the service's libraries: pip install 'samf[serve]'") from None

    from ..inference.pipeline import ReportPipeline
    from .audit import AuditTrail, bundle_record

    cfg, pipeline = cfg or ServiceConfig(), pipeline or PipelineConfig()
    host, port, work, dicom = cfg.host, cfg.port, cfg.work, cfg.dicom_port is not None
    tokens = Tokens(cfg.token, cfg.token_file)
    if not is_loopback(host) and not tokens.required:
        raise SamfError(f"binding {host} (not this machine only) needs a bearer token: --token, SAMF_TOKEN or "
                        "--token-file")
    if dicom and not is_loopback(host) and not cfg.dicom_allow:
        raise SamfError(f"receiving DICOM on {host} (not this machine only) needs the senders' AE titles: "
                        "--dicom-allow AE (repeatable)")
    dicom_tls = (None, None)
    if dicom:
        from .dicom_net import check_ae_title, tls_contexts

        for title in (cfg.ae_title, *cfg.dicom_allow):
            check_ae_title(title, "AE title")
        if cfg.dicom_tls_cert:
            dicom_tls = tls_contexts(cfg.dicom_tls_cert, cfg.dicom_tls_key, cfg.dicom_tls_ca)
    if cfg.tls_cert:
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cfg.tls_cert, cfg.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise SamfError(f"--tls-cert/--tls-key ({cfg.tls_cert}, {cfg.tls_key}): "
                            f"{getattr(e, 'strerror', None) or e}") from None
    for d in cfg.input_dirs:
        if not os.path.isdir(d):
            raise SamfError(f"--input-dir {d}: not a folder")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines name peers and instances
    os.makedirs(work, exist_ok=True)
    store = JobStore(work)
    requeued = store.recover()
    if dicom and cfg.dicom_dest:
        from .dicom_net import parse_destination

        parse_destination(cfg.dicom_dest)  # refused before the bundle loads
    pipe = ReportPipeline(bundle, pipeline)
    audit = AuditTrail(cfg.audit_log, bundle_record(pipe.identity))
    for job in requeued:
        audit.record("requeued", job.id, job.kind, who=job.params.get("who"), scan_sha256=job.params.get("sha256"),
                     outcome="running when the service last stopped: queued again")
    reply = scp = collector = None
    if dicom:
        from .dicom_net import DicomReply, SeriesCollector, queue_series, start_scp

        reply = DicomReply(pipe, cfg.dicom_dest, os.path.join(work, "dicom-out"), cfg.ae_title,
                           results_dir=store.results, retries=cfg.dicom_retries, retry_wait=cfg.dicom_retry_wait,
                           ssl_context=dicom_tls[1])
    runner = JobRunner(store, pipe, batch=max(4 * pipeline.parallel, 8), reply=reply, audit=audit)
    ready = threading.Event()  # set while jobs are taken: cleared on stop
    ready.set()
    app = create_app(store, runner, cfg, tokens, audit, ready)
    runner.start()
    log = logging.getLogger("samf.service")
    if dicom:
        collector = SeriesCollector(os.path.join(work, "dicom-in"), cfg.series_settle,
                                    queue_series(store, pipeline.max_new_tokens, runner.wake.set, audit),
                                    cfg.series_timeout)
        collector.start()
        scp = start_scp(cfg.ae_title, host, cfg.dicom_port, collector, cfg.dicom_allow, ssl_context=dicom_tls[0])
        log.info("DICOM: %s listening on %s:%d%s, results to %s", cfg.ae_title, host, cfg.dicom_port,
                 " (TLS)" if dicom_tls[0] else "", cfg.dicom_dest or "a folder")

    def stopping() -> None:
        """The first thing a stop does, in the signal handler: no new job is taken or begun."""
        if ready.is_set():
            ready.clear()
            runner.stop()
            if reply is not None:
                reply.interrupt.set()
            log.info("stopping: no new job is begun; %d running", len(runner.running()))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            stopping()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            """uvicorn closes idle keep-alive connections at once; over TLS asyncio then waits up to 30 s for each
            client's close_notify, which a client idling in its pool never sends, so a stop took 30 s. Those
            connections have nothing in flight and nothing left to write: abort them. (Plain HTTP closes them at
            once: nothing to do.)"""
            if not cfg.tls_cert:
                return await super().shutdown(sockets)
            done = asyncio.ensure_future(super().shutdown(sockets))
            await asyncio.sleep(0.2)  # uvicorn has asked every connection to close by now
            for conn in list(self.server_state.connections):
                transport = getattr(conn, "transport", None)
                if transport is not None and transport.is_closing() and not transport.get_write_buffer_size():
                    transport.abort()
            await done

    # uvicorn re-raises the signal that stopped it once it has restored the handlers it found: let it find these
    # (which do nothing), so the process ends here, after the jobs, and not by that signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    signal.signal(signal.SIGHUP, lambda *_: tokens.reload())
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=max(1, int(cfg.stop_timeout)),
                            ssl_certfile=cfg.tls_cert, ssl_keyfile=cfg.tls_cert and cfg.tls_key)
    log.info("serving %s on %s://%s:%d (%d job(s) resumed)", pipe.identity.get("llm"),
             "https" if cfg.tls_cert else "http",
             host, port, len(requeued))
    try:
        Server(config).run()
    finally:
        stopping()
        if scp is not None:
            scp.shutdown()
            collector.stop()
        runner.join(timeout=cfg.stop_timeout)
        if runner.is_alive():  # the next start requeues them (JobStore.recover)
            log.warning("stopped with %d job(s) still running after %.0f s: they run again at the next start",
                        len(runner.running()), cfg.stop_timeout)
        else:
            pipe.close()
            audit.close()
            store.close()
            log.info("stopped: every begun job ended")
