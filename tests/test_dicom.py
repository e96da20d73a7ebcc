"""dicom.py against pixels computed by hand (DICOM PS3.3 C.11) on small synthetic files: each
photometric interpretation, signed and unsigned, rescale slope / intercept, windows and a VOI LUT;
and the readers that use it (data.load_image, copies.training_copy)."""
import numpy as np
import pytest

import copies
from data import UnreadableImage, load_image
from dicom import DicomError, read_dicom, write_dicom

U16, I16 = np.uint16, np.int16


def pixels(tmp_path, stored, photometric="MONOCHROME2", **elements):
    path = tmp_path / "x.dcm"
    write_dicom(path, stored, photometric, **elements)
    return read_dicom(path)


def test_no_window_spans_the_image_range_and_monochrome1_is_inverted(tmp_path):
    stored = np.array([[0, 50], [100, 200]], U16)
    assert pixels(tmp_path, stored).tolist() == [[0.0, 63.75], [127.5, 255.0]]  # (p - 0) / 200 * 255
    assert pixels(tmp_path, stored, "MONOCHROME1").tolist() == [[255.0, 191.25], [127.5, 0.0]]


def test_signed_pixels_rescaled_then_linear_window(tmp_path):
    # x = 2 * stored - 100 = [[-2100, -100], [-20, 3900]]; window c 0, w 201: y = ((x + 0.5) / 200 + 0.5)
    # clipped to [0, 1]: [[0, 0.0025], [0.4025, 1]]
    got = pixels(tmp_path, np.array([[-1000, 0], [40, 2000]], I16), RescaleSlope=2, RescaleIntercept=-100,
                 WindowCenter=0, WindowWidth=201)
    assert got == pytest.approx(np.array([[0.0, 0.6375], [102.6375, 255.0]]), abs=1e-3)


def test_first_of_several_windows_then_monochrome1(tmp_path):
    # x = stored - 1024 = [[-1024, 0], [40, 3071]]; window c 40, w 400: y = (x - 39.5) / 399 + 0.5:
    # [[0, 0.401003], [0.501253, 1]]; MONOCHROME1: 255 * (1 - y)
    got = pixels(tmp_path, np.array([[0, 1024], [1064, 4095]], U16), "MONOCHROME1", RescaleSlope=1,
                 RescaleIntercept=-1024, WindowCenter=[40, 400], WindowWidth=[400, 2000])
    assert got == pytest.approx(np.array([[255.0, 152.7444], [127.1805, 0.0]]), abs=1e-3)


def test_linear_exact_and_sigmoid_windows(tmp_path):
    stored = np.array([[100, 150], [200, 300]], U16)
    # LINEAR_EXACT c 200, w 100: (x - 200) / 100 + 0.5 -> [[0, 0], [0.5, 1]]
    got = pixels(tmp_path, stored, WindowCenter=200, WindowWidth=100, VOILUTFunction="LINEAR_EXACT")
    assert got == pytest.approx(np.array([[0.0, 0.0], [127.5, 255.0]]))
    # SIGMOID c 200, w 100: 1 / (1 + exp(-4 (x - 200) / 100)); x = 150: 1 / (1 + e^2) = 0.119203
    got = pixels(tmp_path, stored, WindowCenter=200, WindowWidth=100, VOILUTFunction="SIGMOID")
    assert got[0, 1] == pytest.approx(255 * 0.119203, abs=1e-3) and got[1, 0] == pytest.approx(127.5)


def test_voi_lut_wins_over_the_window(tmp_path):
    # descriptor: 4 entries, the first for value 10, 8 bits; values below 10 take entry 0, above 13 the last
    got = pixels(tmp_path, np.array([[5, 10], [12, 20]], U16), WindowCenter=0, WindowWidth=10,
                 voi_lut=([4, 10, 8], [0, 100, 200, 255]))
    assert got.tolist() == [[0.0, 0.0], [200.0, 255.0]]


def test_load_image_and_training_copy_round_the_display_values(tmp_path, write_dicom):
    path = tmp_path / "w.dcm"
    write_dicom(path, np.array([[0, 1024], [1064, 4095]], U16), RescaleIntercept=-1024,
                WindowCenter=40, WindowWidth=400)  # display values 255 - the MONOCHROME1 ones above
    expected = [[0, 102], [128, 255]]
    im = load_image(path, keep_grey=True)
    assert im.mode == "L" and np.asarray(im).tolist() == expected
    assert np.asarray(load_image(path)).tolist() == [[[v] * 3 for v in row] for row in expected]
    assert np.asarray(copies.training_copy(str(path), 512)).tolist() == expected  # smaller than 512: kept


def test_a_corrupt_dicom_is_unreadable_and_named(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(UnreadableImage, match="bad.dcm"):
        load_image(bad)
    with pytest.raises(UnreadableImage, match="bad.dcm"):
        copies.training_copy(str(bad), 64)


def test_files_that_are_not_one_grey_or_rgb_image_are_refused_by_name(tmp_path):
    with pytest.raises(DicomError, match=r"x.dcm: window width 0.0: expected > 0"):
        pixels(tmp_path, np.array([[1, 2]], U16), WindowCenter=1, WindowWidth=0)
    with pytest.raises(DicomError, match=r"x.dcm: PhotometricInterpretation 'PALETTE COLOR'"):
        pixels(tmp_path, np.array([[1, 2]], U16), "PALETTE COLOR")
