"""Training-size copies of a release's images, made once by prepare.py (so no epoch decodes originals).

A copy is the source resized (bicubic) so that its shorter side is `size` pixels (never enlarged),
saved as an uncompressed TIFF, grey or RGB: lossless, and read 20x faster than a PNG (0.33 ms
against 6.2 ms for a 512 x 615 film, at 1.8x its size: docs/NOTES.md 10). JPEGs are decoded in
PIL's draft mode at the smallest scale whose shorter side is still >= 2 x size: 70% of a full
decode's time, and at most 2 grey levels from full decode + the same resize (mean 0.28, PSNR
53.6 dB). DICOMs are resized from their 16-bit display values (dicom.read_dicom), rounded to 8 bits
last. Each copy is written under a temporary name and renamed when complete, so an interrupted
run can be re-run: finished copies are skipped, a half-written file is never taken for one.
Originals are only read. An unreadable source is reported, never fatal.
"""
import os
from multiprocessing import Pool

import numpy as np
from PIL import Image
from tqdm import tqdm

from data import UnreadableImage, load_image
from dicom import DicomError, is_dicom, read_dicom


def copy_name(rel: str) -> str:
    """Where the copy of source `rel` goes, relative to the copies folder ('a/b.jpg' -> 'a/b.jpg.tif',
    so that 'b.jpg' and 'b.png' beside each other keep apart)."""
    return rel + ".tif"


def shrink(im: Image.Image, size: int) -> Image.Image:
    """`im` resized (bicubic) so that its shorter side is `size`, or unchanged if already smaller."""
    scale = size / min(im.size)
    if scale >= 1:
        return im
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)


def training_copy(src: str, size: int) -> Image.Image:
    """The PIL image ("L" or "RGB") to store for source file `src` at shorter side `size`."""
    if is_dicom(src):
        try:
            pixels = read_dicom(src)  # float32 [H, W] (or [H, W, 3]) in [0, 255]
        except DicomError as e:
            raise UnreadableImage(str(e)) from None
        if pixels.ndim == 3:
            return shrink(Image.fromarray(np.round(pixels).astype(np.uint8)), size)
        small = np.asarray(shrink(Image.fromarray(pixels), size))  # float32 -> mode "F"
        return Image.fromarray(np.round(np.clip(small, 0, 255)).astype(np.uint8))
    return shrink(load_image(src, keep_grey=True, draft_side=2 * size), size)


def make_copy(job: tuple[str, str, int]) -> str | None:
    """Write the copy of job = (src, dst, size) unless dst exists; None, or the reason it failed."""
    src, dst, size = job
    if os.path.exists(dst):
        return None
    try:
        im = training_copy(src, size)
    except UnreadableImage as e:
        return str(e)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.{os.getpid()}.tmp"
    try:
        im.save(tmp, format="TIFF")  # uncompressed
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return None


def make_copies(root: str, rels: list[str], folder: str, size: int, workers: int) -> dict[str, str]:
    """Copies of root/rel for every rel into folder/copy_name(rel), `workers` processes, a progress
    bar; returns {rel: reason} for the unreadable sources (their copies are not made)."""
    jobs = [(os.path.join(root, rel), os.path.join(folder, copy_name(rel)), size) for rel in rels]
    bar = tqdm(total=len(jobs), desc=f"images -> {size} px", unit="img", mininterval=1.0)
    failed = {}
    with Pool(workers) if workers > 1 else _InProcess() as pool:
        for rel, reason in zip(rels, pool.imap(make_copy, jobs, chunksize=16)):
            bar.update()
            if reason:
                failed[rel] = reason
    bar.close()
    return failed


class _InProcess:
    """A stand-in for multiprocessing.Pool with one worker: the jobs run here, in order."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, jobs, chunksize=1):
        return map(fn, jobs)
