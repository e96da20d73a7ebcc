"""Fixtures that several test modules share."""
import pytest

import synth


@pytest.fixture(scope="session")
def bench(tmp_path_factory):
    """The small synthetic benchmark of the fault and cluster tests: 48 / 8 / 16 cases, 64 px."""
    out = tmp_path_factory.mktemp("synth")
    synth.main(["--out", str(out), "--train", "48", "--val", "8", "--test", "16", "--image-size", "64",
                "--workers", "0"])
    return out


def save_dicom(path, stored, photometric="MONOCHROME2", voi_lut=None, **elements):
    """A small single-frame 16-bit DICOM file: `stored` [H, W] (int16 -> signed pixels, else
    unsigned), `elements` set as named (WindowCenter, RescaleSlope, ...), `voi_lut` =
    (LUTDescriptor, LUTData) as a VOI LUT Sequence item."""
    import os

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
    stored = np.asarray(stored)
    signed = stored.dtype == np.int16
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    file_meta.MediaStorageSOPInstanceUID = generate_uid()
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, int(signed)
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
    for name, value in elements.items():
        setattr(ds, name, value)
    if voi_lut is not None:
        item = Dataset()
        item.add_new(0x00283002, "US", voi_lut[0])  # LUTDescriptor
        item.add_new(0x00283006, "US", voi_lut[1])  # LUTData
        ds.VOILUTSequence = Sequence([item])
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)


@pytest.fixture
def write_dicom():
    """save_dicom, for the tests that need DICOM files."""
    return save_dicom
