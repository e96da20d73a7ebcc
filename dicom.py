"""DICOM -> display pixels, the way a radiologist's viewer shows the film (DICOM PS3.3 C.11).

Stored values -> modality values (Rescale Slope / Intercept, C.11.1) -> the file's VOI LUT, else its
first window centre / width (C.11.2, functions LINEAR, LINEAR_EXACT, SIGMOID), else the image's own
min..max -> MONOCHROME1 inverted (its low values are white). The result stays float32 in [0, 255]:
16-bit precision is kept until the caller makes its 8-bit copy. pydicom is optional and imported
only here, when a DICOM is read (data.load_image, prepare.py, predict.py) or written (write_dicom,
for the tests and bench.py).
"""
import os
from collections.abc import Sequence

import numpy as np

SUFFIXES = (".dcm", ".dicom")


class DicomError(ValueError):
    """A DICOM that cannot be shown as one grey (or RGB) image; the message names the file."""


def import_pydicom():
    """pydicom, or SystemExit saying how to install it."""
    try:
        import pydicom
    except ImportError:
        raise SystemExit("reading DICOM needs pydicom: pip install pydicom") from None
    return pydicom


def is_dicom(path) -> bool:
    return str(path).lower().endswith(SUFFIXES)


def window(x: np.ndarray, centre: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Modality values -> [0, 1] through a window (PS3.3 C.11.2.1.2-3); another function name is
    taken as LINEAR, the default."""
    if width <= 0 or (width < 1 and function not in ("LINEAR_EXACT", "SIGMOID")):
        raise DicomError(f"window width {width}: expected > 0 (>= 1 for a LINEAR window)")
    if function == "LINEAR_EXACT":
        return np.clip((x - centre) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - centre) / width))
    if width == 1:
        return (x > centre - 0.5).astype(np.float64)
    return np.clip((x - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def voi_lut(x: np.ndarray, item) -> np.ndarray:
    """Modality values -> [0, 1] through a VOI LUT Sequence item (descriptor: entries, first value,
    bits); values below / above the table take its first / last entry (PS3.3 C.11.2.1.1)."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    table = np.frombuffer(data, "<u2") if isinstance(data, bytes) else np.asarray(data)  # OW or US
    table = table.astype(np.float64).ravel()
    entries = entries or 65536
    index = np.clip(np.round(x).astype(np.int64) - first, 0, min(entries, len(table)) - 1)
    return table[index] / (2 ** bits - 1)


def first(value) -> float:
    """The first of a possibly multi-valued DICOM number (WindowCenter may list several)."""
    return float(value[0]) if isinstance(value, Sequence) and not isinstance(value, str) else float(value)


def display_pixels(ds) -> np.ndarray:
    """A read pydicom dataset -> float32 [H, W] (or [H, W, 3] RGB) display values in [0, 255]."""
    kind = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if kind not in ("MONOCHROME1", "MONOCHROME2", "RGB"):
        raise DicomError(f"PhotometricInterpretation {kind!r}: expected MONOCHROME1, MONOCHROME2 or RGB")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise DicomError(f"{int(ds.NumberOfFrames)} frames: expected a single image")
    pixels = ds.pixel_array  # [H, W], or [H, W, 3] for RGB
    if kind == "RGB":
        return pixels.astype(np.float32)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    x = pixels.astype(np.float64) * slope + intercept  # modality values (C.11.1)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        y = voi_lut(x, ds.VOILUTSequence[0])
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        y = window(x, first(ds.WindowCenter), first(ds.WindowWidth), str(ds.get("VOILUTFunction", "LINEAR")))
    else:
        low, high = x.min(), x.max()
        y = (x - low) / (high - low) if high > low else np.zeros_like(x)
    if kind == "MONOCHROME1":
        y = 1.0 - y
    return (y * 255.0).astype(np.float32)


def read_dicom(path) -> np.ndarray:
    """The display pixels (display_pixels) of the DICOM file `path`; DicomError names the file."""
    pydicom = import_pydicom()
    try:
        return display_pixels(pydicom.dcmread(str(path)))
    except DicomError as e:
        raise DicomError(f"{path}: {e}") from None
    except Exception as e:  # pydicom's errors for a corrupt, truncated or pixel-less file
        raise DicomError(f"{path}: cannot read DICOM ({type(e).__name__}: {e})") from None


def write_dicom(path, stored, photometric="MONOCHROME2", voi_lut=None, **elements):
    """Write a single-frame 16-bit DICOM file (for the tests and bench.py): `stored` [H, W] (int16:
    signed pixels, else unsigned), `elements` set by name (WindowCenter, RescaleSlope, ...),
    `voi_lut` = (LUTDescriptor, LUTData) as a VOI LUT Sequence item."""
    import_pydicom()
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
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
        ds.VOILUTSequence = DicomSequence([item])
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
