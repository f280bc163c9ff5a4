"""Where image decoding becomes the limit of extraction: CPU time per image of what each DataLoader worker of
``fpt extract`` does per sample (``DecodedImages``: ``load_image_file`` + ``lpm_input`` as a tensor in the dtype
it travels in on CUDA, the batch's collate and its way into shared memory, timed in a DataLoader worker; the
low-res copy is made on the device since 2026-11-27) for PNG originals of several
sizes, a large JPEG (decoded at reduced scale through PIL's draft mode), and a mammogram-sized 16-bit DICOM in
JPEG 2000 lossless (CMMD's kind; also with ``--j2k-decode reduced``, at the coarsest wavelet level that still
covers the res) and uncompressed, and how many cores a given images/s needs.

    python -m fpt.bench.decode --res 512 1024 --target 250

Process CPU time (``time.process_time``), median of ``--reps``, one thread: it does not depend on how busy the
machine is. Results: bench/results/decode.json.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fpt.bench.common import WORK_DIR, command_line, write_results

MAMMOGRAM = (3328, 2560)     # rows, columns of a typical full-field digital mammogram


def make_sources(root: Path) -> dict[str, Path]:
    """The test files, generated once: demo-task PNGs at 512-4096 px (RGB; grey at 1024 and 2048), a 4096 px JPEG,
    a 16-bit J2K DICOM, and the same DICOM with a window."""
    from fpt.extract.datasets import synthetic_texture_image

    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for side in (512, 1024, 2048, 4096):
        path = files[f"png {side}px"] = root / f"demo-{side}.png"
        if not path.exists():
            Image.fromarray(synthetic_texture_image(side, 1, [0, side])).save(path)
    for side in (1024, 2048):                  # 8-bit grey, as most medical PNGs are
        path = files[f"png grey {side}px"] = root / f"demo-grey-{side}.png"
        if not path.exists():
            Image.fromarray(synthetic_texture_image(side, 1, [0, side])[..., 0]).save(path)
    path = files["jpeg 4096px (q 90)"] = root / "demo-4096.jpg"
    if not path.exists():
        Image.open(files["png 4096px"]).save(path, quality=90)
    path = files[f"dicom j2k-lossless {MAMMOGRAM[0]}x{MAMMOGRAM[1]} 12-bit"] = root / "mammogram-j2k.dcm"
    if not path.exists():
        write_j2k_dicom(path)
    windowed = files[f"dicom j2k-lossless {MAMMOGRAM[0]}x{MAMMOGRAM[1]} 12-bit, window"] = root / "mammogram-j2k-w.dcm"
    if not windowed.exists():                  # the same pixels, displayed through a window as clinical files are
        import pydicom
        ds = pydicom.dcmread(path)
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.save_as(windowed)
    raw = files[f"dicom uncompressed {MAMMOGRAM[0]}x{MAMMOGRAM[1]} 12-bit, window"] = root / "mammogram-raw-w.dcm"
    if not raw.exists():                       # the same, stored uncompressed, as many PACS exports are
        import pydicom
        ds = pydicom.dcmread(windowed)
        ds.decompress()
        ds.save_as(raw)
    return files


def reduced_j2k_difference(path: Path, res: int, image_res: int) -> dict[str, float]:
    """How far the LPM input of ``--j2k-decode reduced`` is from the full decode's: |difference| of
    ``prepare_image``'s high-res view in 0-255 units (mean, 99th percentile, max)."""
    from fpt.extract.images import FileDecoding, prepare_image

    full, reduced = (prepare_image(FileDecoding(res, r).load(path), res, image_res)[0].astype(np.float64)
                     for r in (False, True))
    d = np.abs(full - reduced)
    return {"mean": round(float(d.mean()), 3), "p99": round(float(np.percentile(d, 99)), 3),
            "max": round(float(d.max()), 3)}


def write_j2k_dicom(path: Path) -> None:
    """A synthetic 12-bit mammogram-sized image (smooth tissue + noise), JPEG 2000 lossless (pydicom's encoder,
    backed by pylibjpeg-openjpeg)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    rng = np.random.default_rng(0)
    rows, cols = MAMMOGRAM
    yy, xx = np.mgrid[:rows, :cols]
    tissue = 2400 * np.exp(-((yy - rows / 2) ** 2 / (0.3 * rows) ** 2 + (xx / (0.7 * cols)) ** 2))
    pixels = np.clip(tissue + rng.normal(0, 40, tissue.shape) + 200, 0, 4095).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"      # digital mammography
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation = "MG", "MONOCHROME2"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.compress(JPEG2000Lossless, pixels)
    ds.save_as(path, enforce_file_format=True)


class _WorkerTiming:
    """A one-item dataset whose item is the timing itself, so that it runs inside a DataLoader worker (where the
    collate stacks into shared memory) and leaves out the worker's start. The first ``warmup`` images are not
    timed: a fresh process's allocator is still growing (a 512 px PNG: ~11 ms each for the first few, ~8 after).
    The item: the medians of CPU ms and of page faults (minor: fresh memory touched) per image."""

    def __init__(self, images, reps: int, warmup: int = 5):
        self.images, self.reps, self.warmup = images, reps, warmup

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> tuple[float, float]:
        times, faults = [], []
        for _ in range(self.warmup + self.reps):
            start, faulted = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            high, _ = self.images.collate([self.images[0]])
            high.share_memory_()                          # what sending the batch does (nothing when already shared)
            times.append(time.process_time() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted)
        return statistics.median(times[self.warmup:]) * 1000, statistics.median(faults[self.warmup:])


def worker_step(path: Path, res: int, reps: int, reduced_j2k: bool = False,
                reuse_memory: bool = True) -> tuple[float, float]:
    """Median process CPU ms and page faults of what a decode worker of ``fpt extract`` on CUDA does for the
    sample ``path``: decoding it (as fpt's file sources do: ``FileDecoding``), the LPM input as a tensor,
    collating it and putting it in shared memory for the main process, timed inside a DataLoader worker started
    as extraction's are (``start_helper``; ``reuse_memory=False``: without it, as before 2026-11-27)."""
    import torch
    from torch.utils.data import DataLoader

    from fpt.extract.images import FileDecoding
    from fpt.extract.run import DecodedImages
    from fpt.store import start_helper

    images = DecodedImages(FileDecoding(res, reduced_j2k), [path], res, "fail", torch.float16)
    return next(iter(DataLoader(_WorkerTiming(images, reps), batch_size=None, num_workers=1,
                                worker_init_fn=start_helper if reuse_memory else None)))


def cpu_ms(path: Path, res: int, reps: int, reduced_j2k: bool = False) -> float:
    """``worker_step``'s CPU ms per image."""
    return worker_step(path, res, reps, reduced_j2k)[0]


def main(argv: list[str] | None = None) -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--res", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--image-res", type=int, default=256)
    p.add_argument("--target", type=float, default=250, help="images/s the decoding must sustain")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--fresh-memory", action="store_true",
                   help="the worker without extraction's malloc setting (as before 2026-11-27)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    cases = [(name, path, False) for name, path in make_sources(WORK_DIR / "decode").items()]
    cases += [(f"{name} (--j2k-decode reduced)", path, True) for name, path, _ in cases if "j2k" in name]
    for name, path, reduced_j2k in cases:
        for res in args.res:
            ms, faults = worker_step(path, res, args.reps, reduced_j2k, reuse_memory=not args.fresh_memory)
            rows.append({"source": name, "res": res, "cpu_ms_per_image": round(ms, 1),
                         "page_faults_per_image": round(faults),
                         "worker_memory": "fresh" if args.fresh_memory else "reused",
                         "images_per_s_per_core": round(1000 / ms, 1),
                         f"cores_for_{args.target:g}_per_s": round(args.target * ms / 1000, 1),
                         **({"lpm_input_vs_full_0_255": reduced_j2k_difference(path, res, args.image_res)}
                            if reduced_j2k else {})})
            print(rows[-1], flush=True)
    out = write_results("decode" + ("-fresh-memory" if args.fresh_memory else ""), "fpt.bench.decode", rows=rows,
                        target=args.target,
                        command=command_line("fpt.bench.decode"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
