"""samf: the workstation CLI -- a scan in, a report out; plus the end-to-end demo.

Runtime commands import no torch; ``demo`` trains, so it loads the training stack lazily.
"""

from __future__ import annotations

import json
import os

import click

from samf.runtime.inference.pipeline import MCQ_METHODS, PipelineConfig
from samf.runtime.tools.bench import BenchConfig

from .common import OutDir, SamfGroup, config_from, config_options, threads_callback
from .demo import DemoConfig

bundle_opt = click.option("--bundle", "bundle_dir", required=True, type=click.Path(),
                          help="bundle directory written by `samf-export bundle`")
trusted_key_opt = click.option(
    "--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False), envvar="SAMF_TRUSTED_KEY",
    help="Ed25519 public key (PEM or OpenSSH) that must have signed the bundle (`samf-export sign`); repeat for "
         "several; default: $SAMF_TRUSTED_KEY (':'-separated)")
quant_opt = config_options(PipelineConfig, only=("quant",))
spacing_opt = click.option("--spacing", nargs=3, type=click.FloatRange(min=0.01, max=100.0), default=None,
                           help="voxel spacing Z Y X in mm: for .npy volumes, or instead of a NIfTI header's")
verbose_opt = click.option("--verbose", is_flag=True,
                           help="name DICOM series by UID and description (identifiers; off by default)")
force_opt = click.option("--force", is_flag=True,
                         help="use a volume whose values do not look like a CT (air, soft tissue, anatomy)")
series_opt = click.option("--series", default=None, help="SeriesInstanceUID, for a DICOM folder with several")
non_ct_opt = click.option("--allow-non-ct", is_flag=True, help="accept a DICOM series whose modality is not CT")
ctrate_opt = click.option("--ctrate-metadata", type=click.Path(dir_okay=False), default=None,
                          help="CT-RATE metadata CSV: spacing and rescale for raw CT-RATE volumes")


def scan_options(f):
    """The options that say how to read SCAN, shared by every command that takes one."""
    for opt in (verbose_opt, force_opt, ctrate_opt, non_ct_opt, series_opt, spacing_opt):
        f = opt(f)
    return f


def pipeline_options(*fields: str):
    """The options of these fields of :class:`PipelineConfig`, with its defaults and help (``--threads`` capped to
    the cores this process may use)."""
    return config_options(PipelineConfig, only=fields, n_threads=dict(callback=threads_callback))


ENCODER_CHOICES = PipelineConfig.__dataclass_fields__["encoders"].metadata["choices"]
gpu_layers_opt, backend_opt, threads_opt = (pipeline_options(f) for f in ("n_gpu_layers", "backend", "n_threads"))


def scan_and_bundle_options(f):
    """SCAN, the bundle to run it through (and who must have signed it), which GGUF, how to read SCAN."""
    for opt in (scan_options, quant_opt, trusted_key_opt, bundle_opt, click.argument("scan", type=click.Path())):
        f = opt(f)
    return f


#: Where the engines run: CPU threads, the encoders' backend and precision, LLM layers on the GPU.
engine_options = pipeline_options("n_threads", "backend", "encoders", "n_gpu_layers")


def _load(scan, spacing=None, series=None, allow_non_ct=False, ctrate_metadata=None, force=False, verbose=False,
          quiet=False):
    """Read SCAN with the options of :func:`scan_options`; say which DICOM series was used."""
    import os

    from samf.runtime.scan.ct import load_scan

    meta = None
    if ctrate_metadata:
        from samf.errors import ScanError
        from samf.runtime.scan.ctrate import read_metadata

        meta = read_metadata(ctrate_metadata).get(os.path.basename(scan.rstrip("/")))
        if meta is None:
            raise ScanError(f"{os.path.basename(scan)} is not in {ctrate_metadata}")
    vol = load_scan(scan, spacing=tuple(spacing) if spacing else None, series=series, allow_non_ct=allow_non_ct,
                    ctrate_meta=meta, force=force, verbose=verbose)
    if not quiet and vol.info.get("choice"):
        click.echo(f"using {vol.info['choice']}", err=True)
    return vol


def _not_blank(ctx, param, value):
    """A text option that was given must say something."""
    if value is not None and not value.strip():
        raise click.BadParameter("is empty")
    return value


def _four_choices(ctx, param, value):
    if len(value) != 4:
        raise click.BadParameter(f"give exactly four choices (A-D), not {len(value)}")
    if any(not v.strip() for v in value):
        raise click.BadParameter("a choice is empty")
    return value


def _timings_line(t: dict) -> str:
    return "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in t.items())


@click.group(cls=SamfGroup)
@click.version_option(package_name="samf")
def main():
    """Turn chest CT scans into radiology reports with a SAMF bundle."""


@main.command()
@click.argument("scans", nargs=-1, type=click.Path())
@click.option("--worklist", "worklists", multiple=True, type=click.Path(dir_okay=False),
              help="a list of scans: .txt, one path per line, or .csv with a path (or scan, image) column; relative "
                   "paths are relative to the list; repeatable")
@bundle_opt
@trusted_key_opt
@quant_opt
@scan_options
@click.option("--request", default=None, callback=_not_blank, help="the report request (default: the trained one)")
@pipeline_options("max_new_tokens")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object per scan instead of text")
@click.option("--out", "out_dir", type=OutDir(), default=None,
              help="write each scan's report (.json and .txt) and reports.jsonl here; a rerun skips the scans "
                   "already reported (same path and content)")
@pipeline_options("parallel")
@click.option("--dicom-out", type=OutDir(), default=None,
              help="for a DICOM series: also write the report as DICOM here, a Comprehensive 3D SR (sr.dcm) and an "
                   "Encapsulated PDF with the slices (report_pdf.dcm), both flagged unverified AI output; for several "
                   "scans, into DICOM_OUT/<scan name>/ for each DICOM series")
@click.option("--evidence", "evidence_dir", type=OutDir(), default=None,
              help="write the slices the model weighted most into EVIDENCE/<scan name>/ for each scan: the top 3 per "
                   "plane as PNGs, a montage that frames them, and evidence.json with every slice's attention")
@engine_options
def report(scans, worklists, bundle_dir, trusted_keys, request, as_json, out_dir, dicom_out, evidence_dir, **given):
    """Write the findings report for each SCAN (a .nii/.nii.gz, a DICOM series folder or an .npy, or a folder of
    scans) and each scan of --worklist.

    One scan prints its report. Several, or --out DIR, run as a batch on one load of the bundle: scans are read
    ahead while the engines work, and --parallel reports are decoded together. A bad scan becomes an error row
    with its reason and the batch goes on; the exit code is 1 if any scan failed."""
    from samf.runtime.inference.pipeline import ReportPipeline
    from samf.runtime.service.worklist import expand_worklist

    if not scans and not worklists:
        raise click.UsageError("give one or more SCANs, or --worklist FILE")
    items = expand_worklist(scans, worklists)
    config = config_from(PipelineConfig, given, trusted_keys=trusted_keys)
    scan_kw = given  # what is left: how to read each scan
    single = out_dir is None and not worklists and len(scans) == 1 and items == list(scans)
    if dicom_out is not None and single and not os.path.isdir(scans[0]):
        raise click.UsageError("--dicom-out needs a DICOM series folder (the SR refers to its images)")
    if single:
        # Refuse a bad scan before loading any model.
        vol = _load(scans[0], quiet=as_json, **scan_kw)
        # One scan per process: 4-bit weights mapped as they are, not repacked (2 s more of loading than
        # repacking saves on one report), and one sequence (--parallel is for batches); the LLM's context: the
        # image rows, the request and --max-tokens.
        with ReportPipeline(bundle_dir, config, repack=False, parallel=1) as pipe:
            if evidence_dir is not None:
                pipe.require_attention()
            extras = dicom_out is not None or evidence_dir is not None
            res = pipe.report(vol, request=request, keep_slices=extras)
            if extras:
                from samf.runtime.outputs.compose import ScanOutputs
                from samf.runtime.outputs.slices_png import scan_folder_name

                written = ScanOutputs(scans[0], res, pipe.pre.slices_per_plane, scan_kw.get("series")).write(
                    dicom_out, evidence_dir and os.path.join(evidence_dir, scan_folder_name(scans[0])))
                for what, where in written.items():
                    click.echo(f"{what}: {', '.join(where) if isinstance(where, list) else where}", err=True)
        if as_json:
            # The input around the result record (Result.to_record), as in the batch's rows.
            click.echo(json.dumps(dict(path=os.path.abspath(scans[0]), input=scans[0], **res.to_record())))
        else:
            click.echo(res.text)
            speed = f"{res.tokens_per_s:.1f} tok/s" if res.decode_steps else "one token"
            click.echo(f"[{_timings_line(res.timings)}  |  {speed}  |  {res.identity['llm']}, "
                       f"{res.identity['encoder_precision']} encoders]", err=True)
        return
    from .batch import report_batch

    failed = report_batch(items, bundle_dir, out_dir, config, request, as_json,
                          lambda path: _load(path, quiet=True, **scan_kw), dicom_out=dicom_out,
                          evidence_dir=evidence_dir, series_uid=scan_kw.get("series"))
    if failed:
        raise SystemExit(1)


@main.command()
@scan_and_bundle_options
@click.option("--question", required=True, callback=_not_blank)
@click.option("--choice", "choices", multiple=True, required=True, callback=_four_choices,
              help="give exactly four, in order A-D")
@click.option("--method", type=click.Choice(MCQ_METHODS), default=MCQ_METHODS[0], show_default=True,
              help="choices: the likeliest of the four answers; generate: the letter of the greedy answer (M3D's "
                   "protocol)")
@engine_options
def vqa(scan, bundle_dir, trusted_keys, question, choices, method, **given):
    """Answer a multiple-choice question about SCAN."""
    from samf.runtime.inference.pipeline import ReportPipeline

    config = config_from(PipelineConfig, given, trusted_keys=trusted_keys)
    vol = _load(scan, **given)
    with ReportPipeline(bundle_dir, config, repack=False, parallel=1) as pipe:  # one question per process, as report
        letter, res = pipe.answer(vol, question, list(choices), method=method)
    click.echo(f"{letter or '?'}  ({res.text})")


@main.command()
@click.argument("scan", type=click.Path())
@scan_options
def info(scan, **scan_kw):
    """Print what was found in SCAN without running a model."""
    import numpy as np

    vol = _load(scan, quiet=True, **scan_kw)
    lines = [("format", vol.info.get("format"))]
    if vol.info.get("format") == "dicom":
        lines += [("series", vol.info["choice"]), ("images", vol.info["images"])]
    hu = vol.hu
    assumed = " (assumed: the file does not record it; set with --spacing)" if vol.info.get("spacing_assumed") else ""
    lines += [("shape", f"{hu.shape} (Z, Y, X), canonical: Z superior, Y anterior, X patient right"),
              ("spacing", f"{tuple(round(s, 3) for s in vol.spacing)} mm{assumed}"),
              ("extent", f"{tuple(int(n * s) for n, s in zip(hu.shape, vol.spacing))} mm")]
    if vol.intensity == "unit":
        lines += [("plane", f"{vol.info.get('plane')} stack (from the file name)"),
                  ("values", f"{float(hu.min()):.2f} .. {float(hu.max()):.2f}, already normalised (M3D): "
                             "no HU windows applied")]
    else:
        lines.append(("HU", f"{float(hu.min()):.0f} .. {float(hu.max()):.0f} (median {float(np.median(hu)):.0f})"))
    for k, v in lines:
        click.echo(f"{k:<9}{v}")


@main.command()
@click.argument("scan", type=click.Path())
@click.option("--out", "out_dir", required=True, type=OutDir(),
              help="the folder OUT/<scan name>/ is written in (made if missing)")
@click.option("--bundle", "bundle_dir", default=None, type=click.Path(),
              help="use this bundle's preprocessing (default: the paper preset's)")
@trusted_key_opt
@scan_options
def slices(scan, out_dir, bundle_dir, trusted_keys, **scan_kw):
    """Write the slices the model will see as PNGs (one per slice and window) plus a montage per plane, into
    OUT/<scan name>/, a folder of this scan's slices only."""
    import os

    from samf.runtime.outputs.slices_png import scan_folder_name, write_slice_pngs
    from samf.runtime.scan.preprocess import PreprocessConfig

    vol = _load(scan, **scan_kw)
    if bundle_dir:
        from samf.runtime.bundle.bundle import read_bundle

        cfg = read_bundle(bundle_dir, verify_hashes=False, trusted_keys=trusted_keys).preprocess
    else:
        cfg = PreprocessConfig()
    folder = os.path.join(out_dir, scan_folder_name(scan))
    files = write_slice_pngs(vol, cfg, folder)
    click.echo(f"wrote {len(files)} images to {folder!r} (montages: {', '.join(f for f in files if 'montage' in f)})")


from .serve_cli import add_service_commands  # noqa: E402 - serve and doctor, with the options above

add_service_commands(main, bundle_opt, trusted_key_opt, quant_opt, engine_options)


@main.command()
@bundle_opt
@trusted_key_opt
@click.option("--data", "data_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="dataset folder with test.csv (e.g. samf-demo/data); default: synthetic chest-CT phantoms")
@config_options(BenchConfig, only=("scans",))
@click.option("--quant", "quants", multiple=True, help="GGUF types to compare (default: all in the bundle)")
@config_options(BenchConfig, only=("new_tokens",))
@click.option("--out", "out_json", type=click.Path(dir_okay=False), default=None, help="also write the results as JSON")
@click.option("--encoders", "encoders", multiple=True, type=click.Choice(ENCODER_CHOICES),
              help=f"encoder precisions to compare, each with every GGUF type (default: {PipelineConfig.encoders}); "
                   "repeatable")
@click.option("--concurrency", multiple=True, type=click.IntRange(min=1, max=64),
              help="instead: scans/hour, latency and decode tok/s with K reports decoded together (the first "
                   "--quant, one --encoders); repeatable, e.g. --concurrency 1 --concurrency 4")
@gpu_layers_opt
@backend_opt
@threads_opt
def bench(bundle_dir, trusted_keys, data_dir, quants, out_json, encoders, concurrency, **given):
    """Per-stage latency, decode speed and quantization cost of a bundle on held-out scans."""
    import tempfile

    from samf.runtime.atomic import atomic_file
    from samf.runtime.tools.bench import format_bench, run_bench

    cfg, engines = config_from(BenchConfig, given), config_from(PipelineConfig, given)
    with tempfile.TemporaryDirectory(prefix="samf-bench-") as tmp:
        if data_dir is None:
            from samf.runtime.tools.phantom import generate_phantom_dataset

            data_dir = tmp
            generate_phantom_dataset(tmp, 0, cfg.scans, seed=cfg.phantom_seed, progress=False)
        out = run_bench(bundle_dir, data_dir, cfg.scans, engines.n_threads, quants or None, cfg.new_tokens,
                        trusted_keys, encoders or (engines.encoders,), engines.backend, concurrency,
                        engines.n_gpu_layers)
        if data_dir == tmp:
            out["data"] = f"{cfg.scans} synthetic phantoms (seed {cfg.phantom_seed})"
    click.echo(format_bench(out))
    if out_json:
        with atomic_file(out_json) as f:
            json.dump(out, f, indent=2)


@main.command()
@config_options(DemoConfig, threads=dict(callback=threads_callback))
def demo(**given):
    """The whole stack on synthetic chest CT: data, training, merge, ONNX, GGUF, bundle, runtime reports."""
    from .demo import run_demo

    run_demo(config_from(DemoConfig, given))


if __name__ == "__main__":
    main()
