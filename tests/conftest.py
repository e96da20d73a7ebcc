"""Fixtures that several test modules share."""
import pytest

import dicom
import synth


@pytest.fixture(scope="session")
def bench(tmp_path_factory):
    """The small synthetic benchmark of the fault and cluster tests: 48 / 8 / 16 cases, 64 px."""
    out = tmp_path_factory.mktemp("synth")
    synth.main(["--out", str(out), "--train", "48", "--val", "8", "--test", "16", "--image-size", "64",
                "--workers", "0"])
    return out


@pytest.fixture
def write_dicom():
    """dicom.write_dicom (needs pydicom), for the tests that need DICOM files."""
    return dicom.write_dicom
