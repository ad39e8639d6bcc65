"""The report back as DICOM: a Comprehensive 3D SR and an Encapsulated PDF from `samf report --dicom-out`, read
back with pydicom and highdicom."""

from __future__ import annotations

import json
import os
import subprocess

import pydicom
import pytest
from cli_runner import invoke_cli
from dicom_writer import PATIENT, write_series

from samf.runtime.tools.phantom import make_phantom


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    p = make_phantom(33, shape=(24, 40, 40), spacing=(8.0, 9.0, 9.0))
    folder = str(tmp_path_factory.mktemp("dicom") / "series")
    uid = write_series(folder, p.volume, p.spacing, patient=PATIENT)
    return folder, uid, p


def _samf(*args):
    return subprocess.run(["samf", *args], capture_output=True, text=True)


def _samf_here(*args):
    """``samf ARGS`` in this process (invoke_cli): the refusals' messages, and outputs whose files are checked."""
    return invoke_cli("samf", *args)


def test_sr_and_pdf_carry_the_report_the_patient_and_the_algorithm(quick, series, tmp_path):
    import highdicom as hd

    folder, uid, _ = series
    out = str(tmp_path / "out")
    r = _samf("report", folder, "--bundle", quick.bundle, "--quant", "F32", "--max-tokens", "32", "--dicom-out", out)
    assert r.returncode == 0, r.stderr
    text = r.stdout.strip()
    sr = hd.sr.srread(os.path.join(out, "sr.dcm"))
    source = pydicom.dcmread(os.path.join(folder, sorted(os.listdir(folder))[0]), stop_before_pixels=True)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"                # Comprehensive 3D SR
    assert sr.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert sr.ContentSequence[0].TextValue.strip() == text
    assert sr.VerificationFlag == "UNVERIFIED" and "not for diagnostic use" in sr.SeriesDescription
    for key in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber"):
        assert sr.get(key) == source.get(key), key
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == uid and len(evidence.ReferencedSOPSequence) == 24
    equipment = sr.ContributingEquipmentSequence[0]
    with open(os.path.join(quick.bundle, "manifest.json")) as f:
        manifest_sha = json.load(f)["integrity"]
    assert equipment.Manufacturer == "samf" and equipment.DeviceSerialNumber == manifest_sha["manifest_sha256"]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"   # Processing Equipment

    pdf = pydicom.dcmread(os.path.join(out, "report_pdf.dcm"))
    assert pdf.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1"                 # Encapsulated PDF
    assert pdf.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert pdf.EncapsulatedDocument.startswith(b"%PDF-") and pdf.PatientID == source.PatientID
    assert pdf.StudyInstanceUID == source.StudyInstanceUID and "not for diagnostic use" in pdf.SeriesDescription


def test_refusals_write_nothing(quick, series, tmp_path):
    folder, _, p = series
    out = tmp_path / "out"
    r = _samf_here("report", os.path.join(quick.data, "scans", "phantom_00000.nii.gz"), "--bundle", quick.bundle,
                   "--dicom-out", str(out))
    assert r.returncode != 0 and "DICOM series folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    partial = tmp_path / "partial"
    write_series(str(partial), p.volume, p.spacing, patient=PATIENT)
    names = sorted(os.listdir(partial))
    positions = sorted(names, key=lambda n: float(pydicom.dcmread(partial / n).ImagePositionPatient[2]))
    os.remove(partial / positions[10])                                        # a slice lost in transfer
    r = _samf_here("report", str(partial), "--bundle", quick.bundle, "--dicom-out", str(out))
    assert r.returncode != 0 and "missing slices" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_sr_points_at_the_source_images_the_top_axial_slices_fall_on(quick, series, tmp_path):
    """The evidence through DICOM geometry: the SR's attention-weighted images are the source images nearest the
    axial top slices (the series is axial, so coronal and sagittal evidence map to none), and evidence.json names
    the same images."""
    import highdicom as hd

    folder, _, _ = series
    out, ev_dir = str(tmp_path / "out"), str(tmp_path / "ev")
    r = _samf_here("report", folder, "--bundle", quick.bundle, "--quant", "F32", "--max-tokens", "8", "--json",
                   "--dicom-out", out, "--evidence", ev_dir)
    assert r.returncode == 0, r.stderr
    axial = json.loads(r.stdout)["evidence"]["top"]["axial"]
    sources = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(os.path.join(folder, n), stop_before_pixels=True)
                                                for n in os.listdir(folder))}
    sr = hd.sr.srread(os.path.join(out, "sr.dcm"))
    finding, weighted = sr.ContentSequence
    assert "ContentSequence" not in finding  # the report text claims no image: the attention is not a finding's
    assert (weighted.ValueType, weighted.ConceptNameCodeSequence[0].CodeValue,
            weighted.ConceptNameCodeSequence[0].CodingSchemeDesignator) == ("CONTAINER", "ATTN-SLICES", "99SAMF")
    comment, *images = weighted.ContentSequence
    assert [(i.ValueType, i.RelationshipType, i.ConceptNameCodeSequence[0].CodeValue) for i in images] == [
        ("IMAGE", "CONTAINS", "ATTN-SLICE")] * 3
    refs = [item.ReferencedSOPSequence[0] for item in images]
    assert len({ref.ReferencedSOPInstanceUID for ref in refs}) == 3
    for ref, slice_ in zip(refs, axial):
        src = sources[ref.ReferencedSOPInstanceUID]
        assert ref.ReferencedSOPClassUID == src.SOPClassUID
        # DICOM's z is the axial slice's location (S); the series is 8 mm apart: the nearest is within 4 mm.
        assert abs(float(src.ImagePositionPatient[2]) - slice_["location_mm"]) <= 4.0 + 1e-3
    assert "axial slice" in comment.TextValue and "not a localisation" in comment.TextValue
    with open(os.path.join(ev_dir, "series", "evidence.json")) as f:
        named = json.load(f)["source_images"]
    assert [(n["plane"], n["instance_number"]) for n in named] == [
        ("axial", int(sources[ref.ReferencedSOPInstanceUID].InstanceNumber)) for ref in refs]
