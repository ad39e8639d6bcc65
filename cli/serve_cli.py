"""``samf serve`` and ``samf doctor``: the service's commands, registered on ``samf`` by
:func:`add_service_commands` (kept apart from ``samf_cli`` so the service's many options live with the service).
Only the command line lives here: the service itself (the HTTP app, its jobs, DICOM, the run until SIGTERM) is
:mod:`samf.runtime.service`, started by :func:`samf.runtime.service.server.serve`.

The options are made from :class:`~samf.runtime.service.config.ServiceConfig` and
:class:`~samf.runtime.inference.pipeline.PipelineConfig` (:func:`samf.cli.common.config_options`), so each default
is written once, in those dataclasses. ``samf serve --config serve.toml`` reads any option from a TOML file (keys:
the long option names without the dashes, e.g. ``dicom-port = 11112``; repeatable options take lists); its values
become the options' defaults, so they reach the same dataclasses, the command line overrides the file, and a key
that names no option is refused.
"""

from __future__ import annotations

import click


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
    """Register ``serve`` and ``doctor`` on ``main`` with the shared option decorators of ``samf_cli``; their own
    options are made from :class:`~samf.runtime.service.config.ServiceConfig` and
    :class:`~samf.runtime.inference.pipeline.PipelineConfig`, with those dataclasses' defaults and help."""
    from samf.runtime.inference.pipeline import PipelineConfig
    from samf.runtime.service.config import ServiceConfig

    from .common import config_from, config_options

    @main.command()
    @click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
                  callback=read_config, help="a TOML file of these options (keys without the dashes); the command "
                                             "line overrides it")
    @bundle_opt
    @trusted_key_opt
    @quant_opt
    @config_options(ServiceConfig)
    @config_options(PipelineConfig, only=("parallel", "max_new_tokens"))
    @engine_options
    def serve(bundle_dir, trusted_keys, **given):
        """Keep the bundle loaded and serve reports over HTTP (OpenAPI at /docs, /openapi.json): POST /v1/reports,
        GET /v1/reports/{id}[/stream|/sr|/pdf], POST /v1/vqa, /healthz, /readyz, /metrics. Jobs persist in WORK; a
        restart resumes them; SIGTERM finishes or requeues the running ones."""
        from samf.runtime.service.server import serve as run_service

        cfg = config_from(ServiceConfig, given)
        pipeline = config_from(PipelineConfig, given, trusted_keys=trusted_keys)
        if cfg.dicom_port is None and (cfg.dicom_allow or cfg.dicom_dest):
            raise click.UsageError("--dicom-allow and --dicom-dest need --dicom-port")
        if (cfg.tls_cert is None) != (cfg.tls_key is None):
            raise click.UsageError("--tls-cert and --tls-key go together")
        if (cfg.dicom_tls_cert is None) != (cfg.dicom_tls_key is None):
            raise click.UsageError("--dicom-tls-cert and --dicom-tls-key go together")
        if cfg.dicom_tls_ca and not cfg.dicom_tls_cert:
            raise click.UsageError("--dicom-tls-ca needs --dicom-tls-cert and --dicom-tls-key")
        run_service(bundle_dir, cfg, pipeline)

    @main.command()
    @click.option("--bundle", "bundle_dir", default=None, type=click.Path(),
                  help="a bundle to verify (every artifact re-hashed) and size memory against")
    @trusted_key_opt
    @config_options(ServiceConfig, only=("dicom_dest", "ae_title", "host", "port", "dicom_port", "work"),
                    dicom_dest=dict(help="AE@HOST:PORT to send a C-ECHO to"),
                    ae_title=dict(help="the calling AE title of the C-ECHO"),
                    host=dict(help="the address the service will bind"),
                    port=dict(help="the HTTP port that must be free", min=1),
                    dicom_port=dict(help="the DICOM port that must be free"),
                    work=dict(help="where the service will keep its jobs (disk)"))
    @click.option("--json", "as_json", is_flag=True, help="print the checks as one JSON object")
    def doctor(bundle_dir, trusted_keys, as_json, **given):
        """Whether this machine can run the service: CPU and llama.cpp's backend, GPU and ONNX Runtime providers,
        memory and disk for the bundle, the bundle verified, the ports free, a C-ECHO to the PACS. Exits 1 with
        one line per blocker."""
        import json
        import sys

        from samf.runtime.tools.doctor import FAIL, run_checks

        cfg = config_from(ServiceConfig, given)
        checks = run_checks(bundle_dir, trusted_keys, cfg.dicom_dest, cfg.host, cfg.port, cfg.dicom_port, cfg.work,
                            cfg.ae_title)
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
