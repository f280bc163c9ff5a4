"""Helpers shared by several test modules (fixtures live in conftest.py); test modules never import each other."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from fpt import cli as fpt_cli
from fpt.cli import app
from fpt.config import extract_config, train_config
from fpt.extract import extract
from fpt.store import DEFAULT_CODEC, Geometry, StoreWriter
from tests.conftest import MICRO, write_image_folder

# ---------------------------------------------------------------- the fpt command in-process

runner = CliRunner()
MICRO_ARGS = ["--backbone", MICRO, "--random-init", "--res", "64", "--image-res", "32", "--device", "cpu",
              "--shard-size", "4", "--batch-size", "4"]


def fails_cleanly(args, message):
    """Run ``fpt args``: exit code 2, no traceback, exactly one ``error:`` line containing ``message``."""
    result = runner.invoke(app, args)
    text = result.output
    assert result.exit_code == 2, text
    assert "Traceback" not in text and result.exception is None or isinstance(result.exception, SystemExit)
    error_lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in " ".join(text.split()), text
    return text


def run(args, width=200):
    """Run ``fpt args`` with a console ``width`` columns wide (no line breaks inside messages)."""
    fpt_cli.console.width = width
    return runner.invoke(app, args)


# ---------------------------------------------------------------- the fpt command in a subprocess

def cli(*args):
    """The command line of ``fpt extract args`` in a fresh Python process."""
    return [sys.executable, "-m", "fpt.cli", "extract", *map(str, args)]


SLOW_RES = 384          # ViT-Tiny at this res takes ~0.3 s an image on the dev box (one core's share)


def slow_extraction(tmp_path):
    """(CLI options, data) for 24 images that take several seconds: ViT-Tiny at ``SLOW_RES`` px, one image per
    batch, shards of 4 (time to interrupt the run after its first shard)."""
    data = write_image_folder(tmp_path / "d", {"train": 8, "val": 2, "test": 2}, size=64)    # 24 images
    return ["--backbone", "vit_tiny_patch16_224", "--random-init", "--res", str(SLOW_RES), "--image-res", "32",
            "--device", "cpu", "--shard-size", "4", "--batch-size", "1", "--data", data], data


def interrupt_after_first_shard(args, store, sig) -> tuple[int, str]:
    """Run ``fpt extract`` in a subprocess, send ``sig`` once its first shard is done; (exit code, stderr)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if zarr.open_group(store, mode="r")["done"][:].sum() >= 4:
                break
        except Exception:
            pass
        time.sleep(0.05)
    assert proc.poll() is None, f"extraction ended before it could be interrupted: {proc.stderr.read()[-500:]}"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


# ---------------------------------------------------------------- stores

ARRAYS = ("keys", "values", "indices", "cls", "images", "labels", "split", "done")
TINY = dict(backbone="vit_tiny_patch16_224", random_init=True, image_res=32, device="cpu")
DASK_CASE = dict(res=64, samples_per_shard=3, batch_size=2, **TINY)   # 20 images in 7 shards


def assert_same_store(a, b):
    """Stores ``a`` and ``b`` hold equal arrays, ids and identity attributes."""
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for name in ARRAYS:
        np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)
    assert ga["ids"][:].tolist() == gb["ids"][:].tolist()
    for section in ("backbone", "extraction", "dataset", "normalization", "geometry"):
        assert ga.attrs[section] == gb.attrs[section]


def dask_case_single_process(tmp_path):
    """The data of the dask tests and its store written by one single-threaded process (like each of the 2
    workers on this 2-core machine): (data, store)."""
    data = write_image_folder(tmp_path / "d", {"train": 6, "val": 2, "test": 2})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract(extract_config(None, data, out=tmp_path / "single.zarr", **DASK_CASE))
    finally:
        torch.set_num_threads(threads)
    return data, tmp_path / "single.zarr"


def shard_file(store, array, shard=0):
    """The file of ``shard`` of ``array`` in a local store."""
    ndim = len(json.loads((store / array / "zarr.json").read_text())["shape"])
    return store / array / "c" / "/".join([str(shard)] + ["0"] * (ndim - 1))


def flip(path, offset):
    """Invert the byte at ``offset`` (modulo the size) of the file ``path``."""
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


# a 7-sample store written directly, without the LPM
GEOM = Geometry(n_samples=7, layers=2, heads=3, k=4, head_dim=5, embed_dim=15, image_res=6, samples_per_shard=3)
ATTRS = {"backbone": {"name": "x", "embed_dim": 15, "heads": 3, "head_dim": 5, "patch_size": 16, "depth": 4,
                      "prefix_tokens": 1, "n_params": 1, "weights_sha256": "0" * 64, "weights_source": "random-init",
                      "random_init": True},
         "extraction": {"res": 64, "layers": [2, 3], "token_ratio": 0.2, "k": 4, "importance": "global",
                        "dtype": "float16", "image_res": 6},
         "dataset": {"name": "t", "classes": ["a", "b"], "source": "t", "counts": {}},
         "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}}


def shard_arrays(n, seed, g=GEOM):
    """Random arrays of ``n`` samples in the shapes of geometry ``g`` and the store's dtypes."""
    rng = np.random.default_rng(seed)
    return {"keys": rng.standard_normal((n, g.layers, g.heads, g.k, g.head_dim)).astype(np.float16),
            "values": rng.standard_normal((n, g.layers, g.heads, g.k, g.head_dim)).astype(np.float16),
            "indices": rng.integers(0, 100, (n, g.layers, g.heads, g.k)).astype(np.int32),
            "cls": rng.standard_normal((n, g.embed_dim)).astype(np.float16),
            "images": rng.integers(0, 255, (n, g.image_res, g.image_res, 3)).astype(np.uint8)}


def open_writer(path, attrs=ATTRS, ids=None, overwrite=False, codec=DEFAULT_CODEC):
    """A StoreWriter of GEOM's 7 samples (labels 0101011, splits 0001122)."""
    ids = np.array(ids or [f"s{i}" for i in range(7)], dtype=object)
    return StoreWriter.open(path, GEOM, attrs, ids=ids, labels=np.array([0, 1, 0, 1, 0, 1, 1]),
                            split=np.array([0, 0, 0, 1, 1, 2, 2]), overwrite=overwrite, codec=codec)


def tiny_train(store, out, **overrides):
    """A TrainConfig for a short CPU training run on ``store``, writing to ``out``."""
    options = dict(out=out, side_res=16, epochs=2, batch_size=4, prompts=3, device="cpu", seed=0)
    options.update(overrides)
    return train_config(store, None, **options)


# ---------------------------------------------------------------- image files

def write_png(path: Path, seed: int, size: int = 24) -> str:
    """A random RGB PNG of ``size`` x ``size + 2`` px at ``path``; its file name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (size, size + 2, 3)).astype(np.uint8)
    Image.fromarray(a).save(path)
    return path.name


def write_manifest(folder: Path, rows: list[dict], columns: tuple[str, ...], create_images: bool = True) -> Path:
    """folder/manifest.csv with ``rows`` (dicts of column -> value); images under folder/images/."""
    folder.mkdir(parents=True, exist_ok=True)
    if create_images:
        for i, row in enumerate(rows):
            write_png(folder / row["path"], i)
    with open(folder / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return folder / "manifest.csv"


MAMMOGRAPHY = "1.2.840.10008.5.1.4.1.1.1.2"     # Digital Mammography X-Ray Image Storage - For Presentation


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12,
                window: tuple | None = None, rescale: tuple[float, float] | None = None,
                patient: str | None = "P1", laterality: str | None = None, laterality_tag: str = "ImageLaterality",
                voi_lut: tuple[int, np.ndarray] | None = None) -> Path:
    """A real DICOM file: ``pixels`` uint16 [H, W] or [F, H, W] (grey) or uint8 [H, W, 3] (RGB; uint16 RGB stores
    ``bits`` bits).

    window: (centres, widths) as numbers or lists; rescale: (slope, intercept); voi_lut: (first input, LUT data).
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MAMMOGRAPHY
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "MG"
    if patient is not None:
        ds.PatientID = patient
    if laterality is not None:
        setattr(ds, laterality_tag, laterality)
    ds.set_pixel_data(pixels, photometric, bits if photometric != "RGB" or pixels.dtype != np.uint8 else 8)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if voi_lut is not None:
        item = Dataset()
        item.add_new("LUTDescriptor", "US", [len(voi_lut[1]), voi_lut[0], 16])
        item.add_new("LUTData", "OW", np.asarray(voi_lut[1], dtype="<u2").tobytes())
        ds.VOILUTSequence = Sequence([item])
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def j2k_dicom(path: Path, stored: np.ndarray, bits: int = 12, window: tuple | None = None) -> Path:
    """``write_dicom``, then JPEG 2000 lossless (pydicom's encoder: skips the test where none is installed)."""
    import pydicom
    import pytest
    from pydicom.pixels import get_encoder
    from pydicom.uid import JPEG2000Lossless

    if not get_encoder(JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 encoder installed (pip install 'fpt[dicom]')")
    write_dicom(path, stored, bits=bits, window=window)
    ds = pydicom.dcmread(path)
    ds.compress(JPEG2000Lossless)
    ds.save_as(path)
    return path


def smooth_stored(shape: tuple[int, int], bits: int, seed: int = 0) -> np.ndarray:
    """A smooth wave with a little noise, in the range of ``bits``-bit stored values: uint16 ``shape``."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    top = 2 ** bits - 1
    wave = top * (0.45 + 0.3 * np.sin(yy / 17) * np.cos(xx / 23))
    return np.clip(wave + np.random.default_rng(seed).normal(0, top / 60, shape), 0, top).astype(np.uint16)


def stored_12bit(shape=(24, 20), seed=0) -> np.ndarray:
    """Random 12-bit stored pixel values, uint16 ``shape``."""
    return np.random.default_rng(seed).integers(0, 4096, shape).astype(np.uint16)


# ---------------------------------------------------------------- attention

def reference_qkv(model, images, layers):
    """Per layer: (q, k, v [B, H, N, d], softmax [B, H, N, N], naive attention output, timm's output [B, N, D]),
    recomputed by hand from each block's input."""
    inputs, outputs = {}, {}
    hooks = []
    for l in layers:
        attn = model.blocks[l].attn
        hooks.append(attn.register_forward_pre_hook(lambda m, a, l=l: inputs.__setitem__(l, a[0])))
        hooks.append(attn.register_forward_hook(lambda m, a, o, l=l: outputs.__setitem__(l, o)))
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    result = {}
    for l in layers:
        attn, x = model.blocks[l].attn, inputs[l]
        B, N, D = x.shape
        qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(B, N, 3, attn.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-2, -1) * attn.head_dim ** -0.5, dim=-1)     # naive attention
        out = attn.proj((probs @ v).transpose(1, 2).reshape(B, N, D))
        result[l] = (q, k, v, probs, out, outputs[l])
    return result


def naive_importance(q, k, scale, mode="global"):
    """Token importance from the full fp64 softmax of the same (possibly rounded) q, k [B, H, N, d]: the mean
    over queries (``global``) or the class token's row (``cls``). -> [B, H, N] fp64."""
    attn = torch.softmax(q.double() @ k.double().transpose(-2, -1) * scale, dim=-1)   # [B, H, N, N]
    return attn.mean(dim=-2) if mode == "global" else attn[:, :, 0]


def assert_is_topk(indices, importance, k, tol=1e-6):
    """``indices`` [B, H, k] are a top-k of ``importance`` [B, H, N]: distinct, and none less important than
    the naive k-th best by more than float noise (near-ties may order either way)."""
    assert indices.shape[-1] == k
    assert all(len(set(row.tolist())) == k for row in indices.reshape(-1, k))
    kth = importance.topk(k, dim=-1).values[..., -1:]
    assert (importance.gather(-1, indices) >= kth - tol).all()


TINY_FAMILY = dict(depth=2, embed_dim=64, num_heads=2, img_size=32, patch_size=8, num_classes=0)


def tiny_family_model(name: str, **extra) -> torch.nn.Module:
    """A 2-block, 64-wide random-init timm model of architecture ``name`` at 32 px, with every bias and norm
    weight perturbed (random-init biases are often zero)."""
    import timm
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **{**TINY_FAMILY, **extra}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model
