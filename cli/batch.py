"""``samf report`` on a worklist: one load of the bundle, results written as each scan finishes, resumable."""

from __future__ import annotations

import datetime
import json
import os
import time

import click

from samf.errors import one_line


def report_batch(items: list, bundle_dir: str, out_dir: str | None, engines: dict, parallel: int,
                 request: str | None, max_tokens: int, as_json: bool, load) -> int:
    """Report every scan of ``items``; returns how many failed. With ``out_dir``, scans already reported there
    (same path, same content) are skipped, and each result is written as it finishes (:mod:`worklist`)."""
    from samf.runtime.pipeline import ReportPipeline
    from samf.runtime.progress import progress_bar
    from samf.runtime.worklist import JSONL, BatchOutput, content_sha256

    output = BatchOutput(out_dir, items) if out_dir else None
    digests = {os.path.abspath(p): content_sha256(p) for p in items} if output else {}
    todo = [p for p in items if not (output and output.done(p, digests[os.path.abspath(p)]))]
    skipped, failed, reported = len(items) - len(todo), 0, 0
    if todo:
        # Many scans per load: 4-bit weights repacked (2 s more loading, faster decoding of every report).
        with ReportPipeline(bundle_dir, repack=True, parallel=parallel, **engines) as pipe, \
                progress_bar(total=len(todo), unit="scan", desc="reports") as bar:
            t0 = time.perf_counter()
            for scan, res in pipe.report_many(todo, request=request, max_new_tokens=max_tokens, load=load):
                path = os.path.abspath(scan)
                row = dict(path=path, scan=scan, sha256=digests.get(path),
                           finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
                if isinstance(res, BaseException):
                    failed += 1
                    row.update(status="failed", error=one_line(res))
                    bar.write(f"failed: {scan}: {row['error']}")
                else:
                    reported += 1
                    row.update(status="ok", report=res.text, tokens=len(res.token_ids),
                               encoders=res.identity["encoder_precision"], timings_s=res.timings,
                               identity=res.identity, scan_info=res.scan, evidence=res.evidence_record())
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
