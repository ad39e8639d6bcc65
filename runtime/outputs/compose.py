"""A reported scan's outputs, composed in one place: the DICOM SR and PDF (:mod:`.dicom_out`) and the evidence
folder (:mod:`.evidence_png`), made from the scan and its :class:`~samf.runtime.inference.pipeline.Result`.

``samf report --dicom-out/--evidence`` (one scan or a batch) writes them with :meth:`ScanOutputs.write`; the service
makes the SR and PDF of a DICOM series with :meth:`ScanOutputs.dicom` (to send them) and
:meth:`ScanOutputs.write_dicom` (to keep them), so every entry point makes the same objects the same way.
"""

from __future__ import annotations

import os
import shutil

from samf.errors import BundleError

from ..inference.evidence import NO_ATTENTION
from .dicom_out import dicom_results, evidence_images, source_instances, write_datasets
from .evidence_png import write_evidence


class ScanOutputs:
    """The outputs of one reported scan. ``result`` must have kept its slices (``keep_slices``): the PDF and the
    evidence images draw them. ``series_uid``: the series of a DICOM folder the report read (``--series``).
    ``job_id``: a service job's, from which the SR's and PDF's UIDs are derived (the same job gives the same
    UIDs); without one each SR and PDF gets new UIDs. The source series' headers are read once, and the SR and
    PDF built once, whatever is asked of them."""

    def __init__(self, scan: str, result, slices_per_plane: int, series_uid: str | None = None,
                 job_id: str | None = None):
        self.scan, self.result, self.slices_per_plane = scan, result, slices_per_plane
        self.series_uid, self.job_id = series_uid, job_id
        self._source = self._dicom = None

    @property
    def is_series(self) -> bool:
        """Whether the scan is a DICOM series folder (the SR and PDF refer to its images; a file has none)."""
        return os.path.isdir(self.scan)

    def source(self) -> tuple:
        """The headers and frames of the series the report read (:func:`~.dicom_out.source_instances`)."""
        if self._source is None:
            self._source = source_instances(self.scan, self.series_uid)
        return self._source

    def dicom(self) -> dict:
        """``{"sr.dcm": SR, "report_pdf.dcm": PDF}`` (:func:`~.dicom_out.dicom_results`): the SR references the
        images the top slices fall on, the PDF's montage frames them."""
        if self._dicom is None:
            res = self.result
            self._dicom = dicom_results(self.scan, res.text, res.identity, res.slices, self.slices_per_plane,
                                        self.series_uid, res.evidence, self.source(), self.job_id)
        return self._dicom

    def write_dicom(self, out_dir: str) -> list:
        """The SR and PDF as ``sr.dcm`` and ``report_pdf.dcm`` in ``out_dir``, both or neither; their paths."""
        return write_datasets(self.dicom(), out_dir)

    def write_evidence(self, out_dir: str) -> str:
        """The evidence folder (:func:`~.evidence_png.write_evidence`); for a DICOM series evidence.json also
        names the source image each top slice falls on. A bundle without attention outputs is refused."""
        res = self.result
        if res.evidence is None:
            raise BundleError(NO_ATTENTION)
        extra = {}
        if self.is_series:
            extra["source_images"] = [
                dict(plane=d["plane"], slice=d["slice"], instance_number=_int_or_none(ds.get("InstanceNumber")),
                     frame=frame) for d, ds, frame in evidence_images(*self.source(), res.evidence)]
        write_evidence(out_dir, res.slices, res.evidence, extra=extra)
        return out_dir

    def write(self, dicom_dir: str | None = None, evidence_dir: str | None = None) -> dict:
        """``samf report``'s --evidence (``evidence_dir``) and --dicom-out (``dicom_dir``: a DICOM series only;
        nothing for a file). Returns what was written, ``{"evidence": folder, "DICOM": [paths]}``; on a failure
        what this call wrote is removed, so no output describes a scan whose row failed."""
        out: dict = {}
        if self.is_series and (dicom_dir is not None or evidence_dir is not None):
            self.source()  # read once, for both, before anything is written
        try:
            if evidence_dir is not None:
                out["evidence"] = self.write_evidence(evidence_dir)
            if dicom_dir is not None and self.is_series:
                out["DICOM"] = self.write_dicom(dicom_dir)
        except BaseException:
            if "evidence" in out:
                shutil.rmtree(evidence_dir, ignore_errors=True)
            raise
        return out


def _int_or_none(value):
    """An InstanceNumber as a number, or None where it is missing or not one (an IS a writer got wrong)."""
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None
