"""Write a canonical [Z, Y, X] HU volume as a real DICOM CT series (for tests), in LPS like a scanner."""

from __future__ import annotations

import os

import numpy as np


def _image_dataset(sop_class, modality: str, series_uid: str, study_uid: str, rows: int, columns: int):
    """A dataset with its file meta, identity and 16-bit monochrome pixel description (both writers' start)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = modality, series_uid, study_uid
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


#: Patient and study attributes a scanner writes (``write_series(..., patient=PATIENT)``), all made up.
PATIENT = dict(PatientName="Doe^Jane", PatientID="PID-0042", PatientBirthDate="19600101", PatientSex="F",
               StudyDate="20261130", StudyTime="101500", StudyID="S42", AccessionNumber="ACC-77",
               ReferringPhysicianName="Who^Doctor")
#: Type-3 patient and study attributes a scanner may add (Patient, General Study and Patient Study modules).
PATIENT_EXTRA = dict(OtherPatientIDs="OLD-7", PatientBirthTime="0830", PatientComments="made up", PatientAge="066Y",
                     PatientWeight=61.5, PatientSize=1.68, StudyDescription="CT CHEST", AdditionalPatientHistory="none")

#: What samf needs to read a CT series (the SOP's UIDs, the series and study it belongs to, where each image
#: is, its rescale and its pixels), and nothing else: the headers a strict de-identification leaves.
READABLE_MINIMUM = ("SOPClassUID", "SOPInstanceUID", "Modality", "SeriesInstanceUID", "StudyInstanceUID",
                    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope",
                    "RescaleIntercept", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
                    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PixelData")


def strip_to_minimum(folder: str, keep=READABLE_MINIMUM) -> None:
    """Remove from every file of ``folder`` each attribute not in ``keep`` (the file meta stays): every type-2
    and type-3 patient, study, series and equipment attribute goes, as a de-identification may do."""
    import pydicom

    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        ds = pydicom.dcmread(path)
        for element in list(ds):
            if element.keyword not in keep:
                del ds[element.tag]
        ds.save_as(path, enforce_file_format=True)


def write_series(folder: str, hu: np.ndarray, spacing, modality: str = "CT", series_uid: str | None = None,
                 names=None, slope: float = 1.0, intercept: float = -1024.0, shuffle_instance=True,
                 patient: dict | None = None) -> str:
    from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid

    os.makedirs(folder, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study = generate_uid()
    nz, ny, nx = hu.shape
    sz, sy, sx = spacing
    rng = np.random.default_rng(0)
    instance = rng.permutation(nz) + 1 if shuffle_instance else np.arange(nz) + 1
    names = names or [f"IMG{rng.integers(1e9):09d}" for _ in range(nz)]
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    for k in range(nz):
        ds = _image_dataset(sop_class, modality, series_uid, study, ny, nx)
        ds.SeriesDescription = f"test {modality}"
        for key, value in (patient or {}).items():
            setattr(ds, key, value)
        ds.InstanceNumber = int(instance[k])
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]   # columns -> patient left, rows -> posterior (LPS)
        ds.ImagePositionPatient = [-100.0, -120.0, 50.0 + k * sz]
        ds.PixelSpacing = [sy, sx]
        ds.SliceThickness = sz
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        raw = np.round((hu[k, ::-1, ::-1] - intercept) / slope)
        ds.PixelData = np.clip(raw, 0, 65535).astype(np.uint16).tobytes()
        ds.save_as(os.path.join(folder, names[k]), enforce_file_format=True)
    return series_uid


def write_enhanced(path: str, hu: np.ndarray, spacing, slope: float = 1.0, intercept: float = -1024.0,
                   frame_order=None) -> str:
    """One Enhanced CT multi-frame file; frames stored in ``frame_order`` (default: shuffled)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedCTImageStorage, generate_uid

    nz, ny, nx = hu.shape
    sz, sy, sx = spacing
    order = np.random.default_rng(1).permutation(nz) if frame_order is None else np.asarray(frame_order)
    ds = _image_dataset(EnhancedCTImageStorage, "CT", generate_uid(), generate_uid(), ny, nx)
    ds.NumberOfFrames = nz

    def item(**kw):
        d = Dataset()
        for k, v in kw.items():
            setattr(d, k, v)
        return d

    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])])
    shared.PixelMeasuresSequence = Sequence([item(PixelSpacing=[sy, sx], SliceThickness=sz)])
    shared.PixelValueTransformationSequence = Sequence([item(RescaleSlope=slope, RescaleIntercept=intercept,
                                                             RescaleType="HU")])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in order:
        f = Dataset()
        f.PlanePositionSequence = Sequence([item(ImagePositionPatient=[-100.0, -120.0, 50.0 + float(k) * sz])])
        per_frame.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    raw = np.round((hu[order][:, ::-1, ::-1] - intercept) / slope)
    ds.PixelData = np.clip(raw, 0, 65535).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SeriesInstanceUID)
