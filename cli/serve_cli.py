"""``samf serve`` and ``samf doctor``: the service's commands, registered on ``samf`` by
:func:`add_service_commands` (kept apart from ``samf_cli`` so the service's many options live with the service).
Only the command line lives here: the service itself (the HTTP app, its jobs, DICOM, the run until SIGTERM) is
:mod:`samf.runtime.service`, started by :func:`samf.runtime.service.server.serve`.

``samf serve --config serve.toml`` reads any option from a TOML file (keys: the long option names without the
dashes, e.g. ``dicom-port = 11112``; repeatable options take lists); the command line overrides the file, and a
key that names no option is refused.
"""

from __future__ import annotations

import os

import click


def _default_service_dir() -> str:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "samf", "service")


def config_keys(command: click.Command) -> dict:
    """TOML key -> click parameter, for every option of ``command`` but ``--config`` and ``--help``."""
    out = {}
    for p in command.params:
        if isinstance(p, click.Option) and p.name not in ("config", "help"):
            longest = max(p.opts, key=len)
            out[longest.lstrip("-")] = p
    return out


def read_config(ctx: click.Context, param, path: str | None):
    """The ``--config`` callback (eager): the TOML file's values become the command's defaults, so anything given
    on the command line (or by an environment variable) wins."""
    if path is None:
        return None
    import tomllib

    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise click.BadParameter(f"{path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{path}: not valid TOML ({e})") from None
    keys = config_keys(ctx.command)
    unknown = sorted(k for k in table if k.replace("_", "-") not in keys)
    if unknown:
        raise click.BadParameter(f"{path}: no such option {', '.join(map(repr, unknown))} (known: "
                                 f"{', '.join(sorted(keys))})")
    defaults = dict(ctx.default_map or {})
    for key, value in table.items():
        p = keys[key.replace("_", "-")]
        if p.multiple and not isinstance(value, list):
            value = [value]
        elif not p.multiple and isinstance(value, (list, dict)):
            raise click.BadParameter(f"{path}: {key} takes one value, not a {type(value).__name__}")
        if isinstance(value, bool) and not p.is_flag:
            raise click.BadParameter(f"{path}: {key} takes a value, not true/false")
        defaults[p.name] = [str(v) for v in value] if p.multiple else (value if p.is_flag else str(value))
    ctx.default_map = defaults
    return path


def add_service_commands(main: click.Group, bundle_opt, trusted_key_opt, quant_opt, engine_options) -> None:
    """Register ``serve`` and ``doctor`` on ``main`` with the shared option decorators of ``samf_cli``."""

    @main.command()
    @click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
                  callback=read_config, help="a TOML file of these options (keys without the dashes); the command "
                                             "line overrides it")
    @bundle_opt
    @trusted_key_opt
    @quant_opt
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="address to bind; any other than this machine's needs --token or --token-file")
    @click.option("--port", type=click.IntRange(min=0, max=65535), default=8080, show_default=True)
    @click.option("--token", envvar="SAMF_TOKEN", default=None,
                  help="bearer token every request must carry (default: $SAMF_TOKEN; named 'token' in the audit "
                       "trail)")
    @click.option("--token-file", type=click.Path(dir_okay=False), default=None,
                  help="named tokens, one 'NAME TOKEN' a line (or a JSON object NAME: TOKEN); reread on SIGHUP and "
                       "when the file changes, so a rotated or revoked token takes effect without a restart")
    @click.option("--tls-cert", type=click.Path(dir_okay=False), default=None,
                  help="serve HTTPS with this certificate (PEM; with --tls-key)")
    @click.option("--tls-key", type=click.Path(dir_okay=False), default=None, help="the --tls-cert's private key")
    @click.option("--work", type=click.Path(file_okay=False), default=_default_service_dir,
                  show_default="$XDG_STATE_HOME/samf/service", help="the job queue (SQLite) and uploaded scans")
    @click.option("--audit-log", type=click.Path(dir_okay=False), default=None, show_default="WORK/audit.jsonl",
                  help="the audit trail: one JSON line per job event (who, what, outcome; no identifiers)")
    @click.option("--input-dir", "input_dirs", multiple=True, type=click.Path(file_okay=False),
                  help="a folder whose scans may be given by path; repeatable (default: uploads only)")
    @click.option("--max-upload-mb", type=click.IntRange(min=1), default=2048, show_default=True)
    @click.option("--max-queue", type=click.IntRange(min=0), default=256, show_default=True,
                  help="queued and running jobs accepted; more get 429")
    @click.option("--parallel", type=click.IntRange(min=1, max=64), default=4, show_default=True,
                  help="reports decoded together")
    @click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1, max=3072),
                  help="the longest report a request may ask for")
    @click.option("--stop-timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
                  help="on SIGTERM, seconds to let running reports finish; those still running are requeued and run "
                       "at the next start")
    @click.option("--dicom-port", type=click.IntRange(min=1, max=65535), default=None,
                  help="also receive CT series over DICOM (C-STORE SCP, C-ECHO) on this port")
    @click.option("--ae-title", default="SAMF", show_default=True, help="this service's DICOM AE title")
    @click.option("--dicom-dest", default=None,
                  help="AE@HOST:PORT the SR and PDF of a DICOM-received series are sent to (C-STORE); default: "
                       "written under WORK/dicom-out/<job id>/")
    @click.option("--series-settle", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
                  help="seconds without a new image after which a received series is complete")
    @click.option("--series-timeout", type=click.FloatRange(min=1), default=3600.0, show_default=True,
                  help="seconds after its first image a series still arriving is dropped (its files removed)")
    @click.option("--dicom-allow", "dicom_allow", multiple=True,
                  help="a calling AE title allowed to send (repeatable; others are rejected at association); "
                       "required when --host is not this machine")
    @click.option("--dicom-retries", type=click.IntRange(min=0, max=20), default=4, show_default=True,
                  help="times a refused or failed C-STORE of the SR and PDF is retried (backoff doubling from "
                       "--dicom-retry-wait) before the job is marked undelivered")
    @click.option("--dicom-retry-wait", type=click.FloatRange(min=0), default=2.0, show_default=True,
                  help="seconds before the first retry")
    @click.option("--dicom-tls-cert", type=click.Path(dir_okay=False), default=None,
                  help="DICOM over TLS: this service's certificate (PEM), for its SCP and its C-STOREs")
    @click.option("--dicom-tls-key", type=click.Path(dir_okay=False), default=None,
                  help="the --dicom-tls-cert's private key")
    @click.option("--dicom-tls-ca", type=click.Path(dir_okay=False), default=None,
                  help="CA certificates (PEM) that peers' certificates must chain to: senders must then present one, "
                       "and --dicom-dest's is checked against them")
    @engine_options
    def serve(bundle_dir, trusted_keys, quant, host, port, token, token_file, tls_cert, tls_key, work, audit_log,
              input_dirs, max_upload_mb, max_queue, parallel, max_tokens, stop_timeout, dicom_port, ae_title,
              dicom_dest, series_settle, series_timeout, dicom_allow, dicom_retries, dicom_retry_wait,
              dicom_tls_cert, dicom_tls_key, dicom_tls_ca, threads, backend, encoders, gpu_layers):
        """Keep the bundle loaded and serve reports over HTTP (OpenAPI at /docs, /openapi.json): POST /v1/reports,
        GET /v1/reports/{id}[/stream|/sr|/pdf], POST /v1/vqa, /healthz, /readyz, /metrics. Jobs persist in WORK; a
        restart resumes them; SIGTERM finishes or requeues the running ones."""
        from samf.runtime.service.server import serve as run_service

        engines = dict(quant=quant, backend=backend, encoders=encoders, n_threads=threads, n_gpu_layers=gpu_layers,
                       trusted_keys=trusted_keys)
        if dicom_port is None and (dicom_allow or dicom_dest):
            raise click.UsageError("--dicom-allow and --dicom-dest need --dicom-port")
        if (tls_cert is None) != (tls_key is None):
            raise click.UsageError("--tls-cert and --tls-key go together")
        if (dicom_tls_cert is None) != (dicom_tls_key is None):
            raise click.UsageError("--dicom-tls-cert and --dicom-tls-key go together")
        if dicom_tls_ca and not dicom_tls_cert:
            raise click.UsageError("--dicom-tls-ca needs --dicom-tls-cert and --dicom-tls-key")
        dicom = None if dicom_port is None else dict(
            port=dicom_port, ae_title=ae_title, dest=dicom_dest, settle_s=series_settle, timeout_s=series_timeout,
            allow=dicom_allow, retries=dicom_retries, retry_wait=dicom_retry_wait,
            tls=None if dicom_tls_cert is None else dict(cert=dicom_tls_cert, key=dicom_tls_key, ca=dicom_tls_ca))
        run_service(bundle_dir, host, port, work, token=token, token_file=token_file, input_dirs=input_dirs,
                    max_upload_mb=max_upload_mb, max_queue=max_queue, parallel=parallel, max_tokens=max_tokens,
                    engines=engines, dicom=dicom, audit_log=audit_log, stop_timeout=stop_timeout,
                    tls=None if tls_cert is None else dict(cert=tls_cert, key=tls_key))

    @main.command()
    @click.option("--bundle", "bundle_dir", default=None, type=click.Path(),
                  help="a bundle to verify (every artifact re-hashed) and size memory against")
    @trusted_key_opt
    @click.option("--dicom-dest", default=None, help="AE@HOST:PORT to send a C-ECHO to")
    @click.option("--ae-title", default="SAMF", show_default=True, help="the calling AE title of the C-ECHO")
    @click.option("--host", default="127.0.0.1", show_default=True, help="the address the service will bind")
    @click.option("--port", type=click.IntRange(min=1, max=65535), default=8080, show_default=True,
                  help="the HTTP port that must be free")
    @click.option("--dicom-port", type=click.IntRange(min=1, max=65535), default=None,
                  help="the DICOM port that must be free")
    @click.option("--work", type=click.Path(file_okay=False), default=_default_service_dir,
                  show_default="$XDG_STATE_HOME/samf/service", help="where the service will keep its jobs (disk)")
    @click.option("--json", "as_json", is_flag=True, help="print the checks as one JSON object")
    def doctor(bundle_dir, trusted_keys, dicom_dest, ae_title, host, port, dicom_port, work, as_json):
        """Whether this machine can run the service: CPU and llama.cpp's backend, GPU and ONNX Runtime providers,
        memory and disk for the bundle, the bundle verified, the ports free, a C-ECHO to the PACS. Exits 1 with
        one line per blocker."""
        import json
        import sys

        from samf.runtime.tools.doctor import FAIL, run_checks

        checks = run_checks(bundle_dir, trusted_keys, dicom_dest, host, port, dicom_port, work, ae_title)
        blockers = [(n, d) for n, s, d in checks if s == FAIL]
        if as_json:
            click.echo(json.dumps({"ok": not blockers, "checks": [dict(name=n, status=s, detail=d)
                                                                  for n, s, d in checks]}, indent=2))
        else:
            for name, status, detail in checks:
                click.echo(f"{status:4}  {name:12} {detail}")
        for name, detail in blockers:
            click.echo(f"error: {name}: {detail}", err=True)
        sys.exit(1 if blockers else 0)
