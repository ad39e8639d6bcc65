"""Results back to the PACS as DICOM, as IHE AI Results and MONAI Deploy do: a Comprehensive 3D SR holding the
report, for systems, and an Encapsulated PDF with the report and the slices the model read, for people.

Sources: the IHE Radiology Technical Framework Supplement "AI Results (AIR)" (Rev. 1.1, section 6.5.3.1: the
algorithm in the Contributing Equipment Sequence); MONAI Deploy App SDK's ``DICOMTextSRWriterOperator`` (the
report as TEXT under LOINC 18748-4 "Diagnostic Imaging Report" in a Comprehensive 3D SR, SOP Class
1.2.840.10008.5.1.4.1.1.88.34, VerificationFlag UNVERIFIED) and ``DICOMEncapsulatedPDFWriterOperator``
(Encapsulated PDF, 1.2.840.10008.5.1.4.1.1.104.1); the IODs themselves are DICOM PS3.3's.

Both are flagged as what they are: the SR's VerificationFlag is UNVERIFIED and both series descriptions say
"not for diagnostic use"; the algorithm (samf, its version and the bundle's manifest digest) is in the
Contributing Equipment Sequence. The source's patient and study modules are copied (highdicom does this from
the evidence), the source series is referenced, and both objects are new series of the source's study.
"""

from __future__ import annotations

import copy
import datetime
import io
import os

import numpy as np

from samf.errors import ScanError

from ..inference.evidence import TOP_PER_PLANE
from .evidence_png import evidence_montage

SERIES_DESCRIPTION = "SAMF AI report - UNVERIFIED, not for diagnostic use"
PDF_SERIES_DESCRIPTION = "SAMF AI report (PDF) - UNVERIFIED, not for diagnostic use"
SR_SERIES_NUMBER, PDF_SERIES_NUMBER = 9901, 9902
MANUFACTURER = "samf"


def samf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("samf")
    except PackageNotFoundError:
        return "unknown"


def source_instances(folder: str, series_uid: str | None = None) -> tuple:
    """The headers (no pixels) of the series ``folder`` was reported from (the one the runtime's loader chose),
    and its frames (:class:`~samf.runtime.scan.dicom.Frame`: where each image is)."""
    import pydicom

    from ..scan.dicom import choose_series, find_series

    series, _ = choose_series(find_series(folder), series_uid)
    return ([pydicom.dcmread(p, stop_before_pixels=True) for p in sorted({f.path for f in series.frames})],
            series.frames)


#: The type-2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that the SR and the PDF
#: copy from the source. A de-identified series may lack any of them; a derived object still carries each,
#: present and empty where the source has no value (PS3.5 7.4.3: type 2 may be zero length).
TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _parses(keyword: str, value) -> bool:
    """Whether highdicom accepts ``value`` for ``keyword`` (it parses dates, times and the sex's enumeration)."""
    from highdicom.enum import PatientSexValues
    from pydicom.valuerep import DA, TM

    parse = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM, "PatientSex": PatientSexValues}.get(keyword)
    if parse is None or value in (None, ""):
        return True
    try:
        parse(value)
    except ValueError:
        return False
    return True


def complete_sources(sources: list) -> list:
    """The source headers as the SR and the PDF need them, whatever a de-identification left out: each image with
    the UIDs that reference it (SOP class and instance from the file meta where the dataset lacks them; a study
    UID made from the series UID where the series has none, the same one for both objects), and the first one,
    whose patient and study modules are copied, with every :data:`TYPE2_PATIENT_STUDY` attribute present: empty
    where the source lacks it or holds a value the standard does not allow (a date that is not YYYYMMDD, a sex
    other than M, F or O). A header that needs nothing is passed on as it is; one that does is copied, never
    changed. Images that still cannot be referenced (no SOP instance UID anywhere) are left out."""
    from pydicom.uid import generate_uid

    if not sources:
        return []
    study = next((str(ds.StudyInstanceUID) for ds in sources if ds.get("StudyInstanceUID")), None)
    if study is None:
        series = str(sources[0].get("SeriesInstanceUID", ""))
        study = generate_uid(entropy_srcs=["samf study of series", series])
    out = []
    for i, ds in enumerate(sources):
        meta = getattr(ds, "file_meta", None) or {}
        fill = {}
        if not ds.get("StudyInstanceUID"):
            fill["StudyInstanceUID"] = study
        for key, meta_key in (("SOPClassUID", "MediaStorageSOPClassUID"),
                              ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not ds.get(key) and meta.get(meta_key):
                fill[key] = str(meta[meta_key].value)
        if i == 0:
            fill.update({key: "" for key in TYPE2_PATIENT_STUDY
                         if key not in ds or not _parses(key, ds[key].value)})
        if fill:
            ds = copy.deepcopy(ds)
            for key, value in fill.items():
                setattr(ds, key, value)
        if ds.get("SOPInstanceUID") and ds.get("SOPClassUID"):
            out.append(ds)
    if not out:
        raise ScanError("no source image has a SOP instance UID: the results would reference no image")
    return out


def evidence_images(sources: list, frames: list, evidence, n: int = TOP_PER_PLANE) -> list:
    """The top slices of ``evidence`` that fall on a source image: ``[(slice description, header, frame number or
    None)]``, best first within each plane. A slice maps to the source image whose plane is parallel to it and
    nearest along its normal, within half the images' spacing (or half the slab it covers): an axial series maps
    axial evidence; coronal and sagittal slices are reformats and map to none."""
    by_path = {ds.filename: ds for ds in sources}  # dcmread keeps the path it read
    normals = np.array([np.cross(f.orientation[:3], f.orientation[3:]) for f in frames])
    out = []
    for plane in range(3):
        normal = evidence.placement.patient_normal(plane)
        parallel = np.abs(normals @ normal) > 0.99
        if not parallel.any():
            continue
        cand = [f for f, ok in zip(frames, parallel) if ok]
        where = np.array([float(np.dot(f.position, normal)) for f in cand])
        gap = float(np.median(np.diff(np.sort(where)))) if len(where) > 1 else 1.0
        slab_mm = 0.0 if evidence.placement.thin else float(
            evidence.placement.step[plane] * evidence.placement.spacing[plane])
        for k in evidence.top(plane, n):
            target = float(np.dot(evidence.placement.patient_point(plane, k), normal))
            i = int(np.argmin(np.abs(where - target)))
            if abs(where[i] - target) <= max(gap, slab_mm) / 2.0 + 1e-3 and cand[i].path in by_path:
                frame = None if cand[i].index is None else cand[i].index + 1
                out.append((evidence.describe(plane, k), by_path[cand[i].path], frame))
    return out


def _equipment(identity: dict):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=f"SAMF report generator ({identity.get('llm', '?')}, "
                                f"{identity.get('encoder_precision', '?')} encoders)"[:64],
        software_versions=samf_version(), device_serial_number=(identity.get("bundle_sha256") or "unsealed")[:64],
        contribution_description="Draft radiology report generated by AI; unverified, not for diagnostic use")


def evidence_summary(evidence, images: list, n: int = TOP_PER_PLANE) -> str:
    """The top slices in words, for the SR's comment and the PDF: plane, location, weights, source image."""
    on_image = {(d["plane"], d["slice"]): (ds, frame) for d, ds, frame in images}
    parts = []
    for plane in range(3):
        for k in evidence.top(plane, n):
            d = evidence.describe(plane, k)
            w = f"alpha {d['alpha']:.3f}" + (f", gamma {d['gamma']:.3f}" if "gamma" in d else "")
            where = f"{d['location_axis']} {d['location_mm']:.1f} mm"
            img = ""
            if (d["plane"], k) in on_image:
                ds, frame = on_image[d["plane"], k]
                img = f", image {ds.get('InstanceNumber', '?')}" + (f" frame {frame}" if frame else "")
            parts.append(f"{d['plane']} slice {k} ({where}; {w}{img})")
    return (f"Slices the model weighted most (attention; ranked by the {evidence.ranking}; not a localisation): "
            + "; ".join(parts) + ".")


#: Private codes (a "99" coding scheme, as DICOM allows) for the attention evidence. No standard concept says "a
#: slice a model weighted": "Best illustration of finding" (DCM 121080) would tell a viewer the finding is on
#: it, which benchmarks/evidence.md measured to be false for the demo model.
ATTENTION_SCHEME = "99SAMF"
#: The scheme's declaration (Coding Scheme Identification Sequence, PS3.3 C.12.1.1.4), which a private scheme
#: needs for a receiver to know what it is.
ATTENTION_SCHEME_NAME = "samf attention evidence codes"
ATTENTION_SCHEME_OWNER = "samf (the SAMF CT report generator)"
ATTENTION_SLICES = ("ATTN-SLICES", "Slices weighted by the model's attention")
ATTENTION_SLICE = ("ATTN-SLICE", "Attention-weighted slice, not a localisation")


def job_uids(job_id: str, sources: list, identity: dict) -> dict:
    """The SR's and the PDF's Series and SOP Instance UIDs for a service job, derived from the job's id, the source
    series' UID and the bundle's manifest digest: a job that runs again (the service was killed after the C-STORE
    of its results but before it recorded the job done) sends the same objects under the same UIDs, which a PACS
    stores once. ``{"sr": (series, instance), "pdf": (series, instance)}``."""
    from pydicom.uid import generate_uid

    series = str(sources[0].get("SeriesInstanceUID", "")) if sources else ""
    seed = ["samf job results", job_id, series, identity.get("bundle_sha256") or "unsealed"]
    return {kind: (generate_uid(entropy_srcs=[*seed, kind, "series"]),
                   generate_uid(entropy_srcs=[*seed, kind, "instance"])) for kind in ("sr", "pdf")}


def report_sr(sources: list, text: str, identity: dict, evidence=None, images: list = (), uids: tuple | None = None):
    """A Comprehensive 3D SR: the report as TEXT under a LOINC 18748-4 "Diagnostic Imaging Report" container; with
    ``evidence``, a second container (:data:`ATTENTION_SLICES`) holds a comment listing every top slice and its
    weights, and references the source images the top slices fall on (``images`` from :func:`evidence_images`).
    ``uids``: its (Series, SOP Instance) UIDs (:func:`job_uids`); new ones without."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    if not sources:
        raise ScanError("no source DICOM images to attach the report to")
    sources = complete_sources(sources)
    rel = hd.sr.RelationshipTypeValues
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport)
    items = [hd.sr.TextContentItem(name=codes.DCM.Finding, value=text, relationship_type=rel.CONTAINS)]
    if evidence is not None:
        slices = hd.sr.ContainerContentItem(name=hd.sr.CodedConcept(ATTENTION_SLICES[0], ATTENTION_SCHEME,
                                                                    ATTENTION_SLICES[1]),
                                            relationship_type=rel.CONTAINS)
        name = hd.sr.CodedConcept(ATTENTION_SLICE[0], ATTENTION_SCHEME, ATTENTION_SLICE[1])
        slices.ContentSequence = hd.sr.ContentSequence(
            [hd.sr.TextContentItem(name=codes.DCM.Comment, value=evidence_summary(evidence, images),
                                   relationship_type=rel.CONTAINS)]
            + [hd.sr.ImageContentItem(name=name, referenced_sop_class_uid=ds.SOPClassUID,
                                      referenced_sop_instance_uid=ds.SOPInstanceUID, referenced_frame_numbers=frame,
                                      relationship_type=rel.CONTAINS)
               for ds, frame in {(ds.SOPInstanceUID, frame): (ds, frame) for _, ds, frame in images}.values()])
        items.append(slices)
        schemes = [hd.coding_schemes.CodingSchemeIdentificationItem(
            ATTENTION_SCHEME, name=ATTENTION_SCHEME_NAME, responsible_organization=ATTENTION_SCHEME_OWNER)]
    else:
        schemes = None
    root.ContentSequence = hd.sr.ContentSequence(items)
    series_uid, instance_uid = uids or (generate_uid(), generate_uid())
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources, content=root, series_instance_uid=series_uid, series_number=SR_SERIES_NUMBER,
        sop_instance_uid=instance_uid, instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        is_final=False, is_verified=False, contributing_equipment=[_equipment(identity)],
        series_description=SERIES_DESCRIPTION, coding_schemes=schemes)
    return sr


#: The montage's caption, drawn above it.
MONTAGE_CAPTION = "The slices the model read (rows: axial, coronal, sagittal; lung window)."
MONTAGE_CAPTION_EVIDENCE = (" Framed: the slices it weighted most (orange, blue, green: ranks 1-3); the bar under "
                            "each slice is its weight.")


def report_pdf_bytes(text: str, identity: dict, montage: np.ndarray | None, evidence_text: str | None = None) -> bytes:
    """The report for people: a header that says what it is, the text, the slices the model read, the algorithm.

    Every block starts at the left margin (fpdf2's ``multi_cell`` leaves the cursor at the right margin unless
    told otherwise). The montage is as wide as the text but never taller than a page, and starts a new page
    (with its caption) where it would not fit on the current one."""
    from fpdf import FPDF
    from fpdf.enums import XPos, YPos
    from PIL import Image

    def paragraph(height: float, words: str) -> None:
        pdf.multi_cell(0, height, words.encode("latin-1", "replace").decode("latin-1"),
                       new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(True, margin=15)
    pdf.add_page()
    pdf.set_font("helvetica", "B", 14)
    paragraph(8, "AI-generated draft report: UNVERIFIED, not for diagnostic use")
    pdf.set_font("helvetica", size=11)
    pdf.ln(2)
    paragraph(6, text or "(empty report)")
    if montage is not None:
        png = io.BytesIO()
        Image.fromarray(montage).save(png, format="PNG")
        png.seek(0)
        rows, cols = montage.shape[:2]
        caption = 12.0                                      # two lines of 5 mm and the gap under them
        w = min(pdf.epw, (pdf.eph - caption) * cols / rows)
        h = w * rows / cols
        pdf.ln(4)
        if pdf.get_y() + caption + h > pdf.page_break_trigger:
            pdf.add_page()
        pdf.set_font("helvetica", "I", 9)
        paragraph(5, MONTAGE_CAPTION + (MONTAGE_CAPTION_EVIDENCE if evidence_text else ""))
        pdf.ln(2)
        pdf.image(png, x=pdf.l_margin + (pdf.epw - w) / 2, y=pdf.get_y(), w=w, h=h)
        pdf.set_y(pdf.get_y() + h)
    if evidence_text:
        pdf.ln(2)
        pdf.set_font("helvetica", size=9)
        paragraph(5, evidence_text)
    pdf.ln(4)
    pdf.set_font("helvetica", size=8)
    paragraph(4, f"samf {samf_version()}; model {identity.get('llm', '?')}; bundle "
                 f"{identity.get('bundle_sha256') or 'unsealed'}; created "
                 f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    return bytes(pdf.output())


def report_pdf(sources: list, text: str, identity: dict, montage: np.ndarray | None = None,
               evidence_text: str | None = None, uids: tuple | None = None):
    """An Encapsulated PDF instance in the source's study, with its patient and study modules. ``uids``: its
    (Series, SOP Instance) UIDs (:func:`job_uids`); new ones without."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian, generate_uid

    if not sources:
        raise ScanError("no source DICOM images to attach the report to")
    src = complete_sources(sources)[0]
    series_uid, instance_uid = uids or (generate_uid(), generate_uid())
    ds = hd.SOPClass(
        study_instance_uid=src.StudyInstanceUID, series_instance_uid=series_uid, series_number=PDF_SERIES_NUMBER,
        sop_instance_uid=instance_uid, sop_class_uid=EncapsulatedPDFStorage, instance_number=1, modality="DOC",
        manufacturer=MANUFACTURER, transfer_syntax_uid=ExplicitVRLittleEndian,
        patient_id=src.get("PatientID"), patient_name=src.get("PatientName"),
        patient_birth_date=src.get("PatientBirthDate"), patient_sex=src.get("PatientSex") or None,
        accession_number=src.get("AccessionNumber"), study_id=src.get("StudyID"), study_date=src.get("StudyDate"),
        study_time=src.get("StudyTime"), referring_physician_name=src.get("ReferringPhysicianName"),
        series_description=PDF_SERIES_DESCRIPTION, software_versions=samf_version(),
        specific_character_set=src.get("SpecificCharacterSet"))
    ds.ConversionType = "WSD"  # SC Equipment (type 1): made on a workstation
    pdf = report_pdf_bytes(text, identity, montage, evidence_text)
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.DocumentTitle = "AI draft radiology report (unverified)"
    ds.BurnedInAnnotation = "YES"
    ds.ConceptNameCodeSequence = [hd.sr.CodedConcept.from_code(codes.LN.DiagnosticImagingReport)]
    now = datetime.datetime.now()
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ContributingEquipmentSequence = [_equipment(identity)]
    return ds


def montage(slices: np.ndarray, slices_per_plane: int, channel: int = 0) -> np.ndarray:
    """``[3·S, C, H, W]`` preprocessed slices in [-1, 1] -> one uint8 image, a row per plane."""
    from .slices_png import to_uint8

    return to_uint8(np.concatenate([np.concatenate(list(slices[p * slices_per_plane:(p + 1) * slices_per_plane,
                                                              channel]), axis=1) for p in range(3)], axis=0))


def dicom_results(folder: str, text: str, identity: dict, slices: np.ndarray | None = None,
                  slices_per_plane: int = 8, series_uid: str | None = None, evidence=None, source=None,
                  job_id: str | None = None) -> dict:
    """``{"sr.dcm": SR, "report_pdf.dcm": PDF}`` for the series of ``folder`` (the one the loader reads); with
    ``evidence`` (:class:`~samf.runtime.inference.evidence.Evidence`) the SR references the images the top slices
    fall on and the PDF's montage frames them. ``source``: :func:`source_instances` of ``folder``, when already read.
    ``job_id``: a service job's, from which their UIDs are derived (:func:`job_uids`: the same job gives the same
    UIDs); without one (``samf report --dicom-out``) each call makes new UIDs."""
    try:
        import fpdf  # noqa: F401
        import highdicom  # noqa: F401
    except ImportError:
        raise ScanError("DICOM results need highdicom and fpdf2: pip install 'samf[serve]'") from None
    sources, frames = source or source_instances(folder, series_uid)
    sources = complete_sources(sources)
    images = evidence_images(sources, frames, evidence) if evidence is not None else []
    said = evidence_summary(evidence, images) if evidence is not None else None
    if slices is None:
        image = None
    elif evidence is not None:
        image = evidence_montage(slices, evidence)
    else:
        image = montage(slices, slices_per_plane)
    uids = job_uids(job_id, sources, identity) if job_id is not None else {}
    return {"sr.dcm": report_sr(sources, text, identity, evidence, images, uids.get("sr")),
            "report_pdf.dcm": report_pdf(sources, text, identity, image, said, uids.get("pdf"))}


def write_dicom_results(folder: str, text: str, identity: dict, out_dir: str, slices: np.ndarray | None = None,
                        slices_per_plane: int = 8, series_uid: str | None = None, evidence=None,
                        source=None, job_id: str | None = None) -> list:
    """:func:`dicom_results` as ``sr.dcm`` and ``report_pdf.dcm`` in ``out_dir`` (:func:`write_datasets`)."""
    return write_datasets(dicom_results(folder, text, identity, slices, slices_per_plane, series_uid, evidence,
                                        source, job_id), out_dir)


def write_datasets(results: dict, out_dir: str) -> list:
    """``{file name: dataset}`` written into ``out_dir``, each atomically, all built before any is written; a
    failure writing one removes those written before it. Returns the paths."""
    from ..atomic import atomic_file

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    try:
        for name, ds in results.items():
            path = os.path.join(out_dir, name)
            with atomic_file(path, "wb") as f:
                ds.save_as(f, enforce_file_format=True)
            paths.append(path)
    except BaseException:
        for path in paths:
            os.remove(path)
        raise
    return paths
