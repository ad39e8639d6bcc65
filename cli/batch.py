"""``samf report`` on a worklist: one load of the bundle, results written as each scan finishes, resumable."""

from __future__ import annotations

import datetime
import json
import os
import time

import click

from samf.errors import one_line


def report_batch(items: list, bundle_dir: str, out_dir: str | None, config, request: str | None, as_json: bool,
                 load, dicom_out: str | None = None, evidence_dir: str | None = None,
                 series_uid: str | None = None) -> int:
    """Report every scan of ``items`` with the pipeline ``config`` (a
    :class:`~samf.runtime.inference.pipeline.PipelineConfig`: its ``parallel`` reports decoded together, at most
    ``max_new_tokens`` each); returns how many failed. With ``out_dir``, scans already reported there
    (same path, same content) are skipped, and each result is written as it finishes (:mod:`worklist`).
    ``dicom_out``/``evidence_dir``: each scan's SR and PDF (DICOM series only), evidence images, under
    ``<dir>/<scan name>/`` (:meth:`~samf.runtime.outputs.compose.ScanOutputs.write`); a scan whose outputs
    cannot be written fails."""
    from samf.runtime.inference.pipeline import ReportPipeline
    from samf.runtime.outputs.compose import ScanOutputs
    from samf.runtime.progress import progress_bar
    from samf.runtime.service.worklist import JSONL, BatchOutput, content_sha256, output_names

    output = BatchOutput(out_dir, items) if out_dir else None
    names = output.names if output else output_names(items)
    extras = dicom_out is not None or evidence_dir is not None
    digests = {os.path.abspath(p): content_sha256(p) for p in items} if output else {}
    todo = [p for p in items if not (output and output.done(p, digests[os.path.abspath(p)]))]
    skipped, failed, reported = len(items) - len(todo), 0, 0
    if todo:
        # Many scans per load: 4-bit weights repacked (2 s more loading, faster decoding of every report).
        with ReportPipeline(bundle_dir, config, repack=True) as pipe:
            if evidence_dir is not None:
                pipe.require_attention()  # before any scan is read, and before the progress bar
            with progress_bar(total=len(todo), unit="scan", desc="reports") as bar:
                t0 = time.perf_counter()
                for scan, res in pipe.report_many(todo, request=request, load=load, keep_slices=extras):
                    path = os.path.abspath(scan)
                    # The batch's own fields, then the result record (Result.to_record) or the error.
                    row = dict(path=path, input=scan, sha256=digests.get(path),
                               finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
                    if extras and not isinstance(res, BaseException):
                        try:
                            written = ScanOutputs(scan, res, pipe.pre.slices_per_plane, series_uid).write(
                                dicom_out and os.path.join(dicom_out, names[path]),
                                evidence_dir and os.path.join(evidence_dir, names[path]))
                            row.update({"dicom_out" if k == "DICOM" else "evidence_dir": v for k, v in written.items()})
                            if dicom_out is not None and "DICOM" not in written:
                                bar.write(f"no DICOM results for {scan}: not a DICOM series folder",
                                          file=click.get_text_stream("stderr"))
                        except Exception as e:  # noqa: BLE001 - this scan's outputs failed; the batch goes on
                            res = e
                    if isinstance(res, BaseException):
                        failed += 1
                        row.update(status="failed", error=one_line(res))
                        bar.write(f"failed: {scan}: {row['error']}")
                    else:
                        reported += 1
                        row.update(status="ok", **res.to_record())
                    if output:
                        output.write(row)
                    if as_json:
                        bar.write(json.dumps(row), file=click.get_text_stream("stdout"))
                    elif not output:
                        bar.write(f"# {scan}\n{row.get('report') or 'error: ' + row['error']}\n",
                                  file=click.get_text_stream("stdout"))
                    bar.update(1)
                    bar.set_postfix(per_min=f"{60 * bar.n / (time.perf_counter() - t0):.1f}")
    if output:
        output.finish()
    where = f" -> {os.path.join(out_dir, JSONL)}" if out_dir else ""
    click.echo(f"{reported} reported, {skipped} already done, {failed} failed{where}", err=True)
    return failed
