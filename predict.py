"""``fpt predict``: class probabilities for new images from a trained checkpoint. It lives above both stages:
it runs the LPM as extraction does (``fpt.extract.encode_batch``), then the trained side network.

Every image goes the way the store's samples went: the same LPM (its weights checked against the sha256 the
checkpoint recorded from the store), the same resolution, layers, token ratio and importance, the same low-res
copy and normalisation; the K/V are rounded to float16 as the store holds them; then the side network (or the
linear probe) in eval mode.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from fpt import FptError
from fpt.config import check_lpm_weights, resolve_device
from fpt.extract import (IMAGE_EXTENSIONS, FileDecoding, FrozenLPM, create_backbone, encode_batch, low_res_copy,
                         lpm_input, stack_pixels)
from fpt.train import SideInput, load_checkpoint

CSV_PATH_COLUMNS = ("path", "image", "file")


def collect_images(inputs: list[Path]) -> list[Path]:
    """Image files from files, folders (searched recursively) and CSV lists (a ``path``/``image``/``file``
    column, else the first column; relative paths are relative to the CSV's folder), in the order given."""
    if not inputs:
        raise FptError("give at least one image, folder or CSV file")
    images: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise FptError(f"{item}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder")
            images += found
        elif item.suffix.lower() == ".csv" and item.is_file():
            images += _csv_images(item)
        elif item.is_file():
            images.append(item)
        else:
            raise FptError(f"{item}: no such file or folder")
    return images


def _csv_images(path: Path) -> list[Path]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FptError(f"cannot read {path}: {e}") from None
    if not rows:
        raise FptError(f"{path}: empty CSV")
    header = [c.strip().lower() for c in rows[0]]
    column = next((header.index(c) for c in CSV_PATH_COLUMNS if c in header), None)
    body = rows[1:] if column is not None else rows
    column = column or 0
    images = [path.parent / row[column].strip() for row in body if len(row) > column and row[column].strip()]
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise FptError(f"{path}: {len(missing)} listed image(s) do not exist, e.g. {missing[0]}")
    if not images:
        raise FptError(f"{path}: lists no images")
    return images


@dataclass
class LoadedPredictor:
    lpm: FrozenLPM
    model: torch.nn.Module
    side_input: SideInput
    res: int
    image_res: int
    mean: list[float]         # the store's normalisation, per channel in [0, 1]
    std: list[float]
    classes: list[str]
    method: str
    device: torch.device
    precision: str            # the store's (stores that predate its record: bf16 on CUDA, fp32 on a CPU, as then)
    decoding: FileDecoding    # files decoded as the store's extraction decoded them


def load_predictor(checkpoint: Path, weights: Path | None = None, random_init: bool = False,
                   device: str = "auto") -> LoadedPredictor:
    """The checkpoint's model and the LPM it was trained from; refused when the LPM weights differ."""
    check_lpm_weights(weights, random_init)
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    identity = ckpt.store
    check_lpm_weights_given(identity["weights_source"], weights, random_init)
    ex = identity["extraction"]
    lpm_model, info = create_backbone(identity["backbone"], ex["res"], weights, random_init)
    if info.weights_sha256 != identity["weights_sha256"]:
        how = "--random-init" if random_init else f"--weights {weights}" if weights else "timm's pretrained weights"
        raise FptError(f"the LPM weights ({how}, sha256 {info.weights_sha256[:12]}…) differ from those the store "
                       f"was extracted with (sha256 {identity['weights_sha256'][:12]}…); pass the same --weights "
                       "file (or --random-init for a random-init store)")
    lpm = FrozenLPM(lpm_model, list(ex["layers"]), ex["token_ratio"], ex["importance"]).to(dev)
    if lpm.n_selected(ex["res"]) != ex["k"]:
        raise FptError(f"{checkpoint}: the recorded extraction (k={ex['k']}) does not match its settings")
    norm = identity["normalization"]
    return LoadedPredictor(
        lpm=lpm, model=ckpt.model.to(dev).eval(), side_input=SideInput(ckpt.spec.side_res, norm["mean"], norm["std"]),
        res=ex["res"], image_res=ex["image_res"],
        mean=list(norm["mean"]), std=list(norm["std"]),
        classes=list(identity["classes"]), method=ckpt.spec.method, device=dev,
        precision=ex.get("precision", "bf16" if dev.type == "cuda" else "fp32"),
        decoding=FileDecoding(ex["res"], reduced_j2k=ex.get("j2k_decode") == "reduced"))


def check_lpm_weights_given(source: str, weights: Path | None, random_init: bool) -> None:
    """Refuse, before any model is built, a request that would fetch timm's pretrained weights (a download, with
    retries) when the store's LPM did not come from there. ``source``: the store's ``weights_source``, one of
    "random-init", "file:<name>", "timm-pretrained". Weights that are given are checked by their sha256."""
    if weights is not None or random_init or source == "timm-pretrained":
        return
    if source == "random-init":
        raise FptError("the checkpoint was trained on a store extracted with a random-init LPM; pass --random-init")
    raise FptError(f"the checkpoint's store was extracted with the LPM weights file {source.removeprefix('file:')}; "
                   "pass it with --weights FILE")


@dataclass(frozen=True)
class Prediction:
    image: str
    prediction: str                       # the most probable class
    probabilities: dict[str, float]       # class -> p


@dataclass(frozen=True)
class Predictions:
    checkpoint: str
    method: str
    classes: list[str]
    rows: list[Prediction]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def predict_images(checkpoint: Path, inputs: list[Path], weights: Path | None = None, random_init: bool = False,
                   device: str = "auto", batch_size: int = 8,
                   progress: Callable[[int, int], None] | None = None) -> Predictions:
    """The class probabilities of every image of ``inputs`` (files, folders, CSV lists)."""
    if batch_size < 1:
        raise FptError(f"--batch-size {batch_size}: must be at least 1")
    images = collect_images(inputs)
    p = load_predictor(checkpoint, weights, random_init, device)
    rows = []
    for start in range(0, len(images), batch_size):
        # as extraction prepares a sample: the LPM's input, and on its device the low-res copy of it
        high = stack_pixels([torch.from_numpy(lpm_input(p.decoding.load(path), p.res))
                             for path in images[start:start + batch_size]], torch.float32).to(p.device)
        low = low_res_copy(high, p.image_res)                                        # [B, R, R, 3]
        batch = {"images": low.permute(0, 3, 1, 2), **encode_batch(p.lpm, high, p.mean, p.std, p.precision)}
        probs = p.model.forward_batch(batch, partial(p.side_input, train=False)).float().softmax(-1).cpu()
        for path, row in zip(images[start:], probs.tolist()):
            rows.append(Prediction(str(path), p.classes[max(range(len(row)), key=row.__getitem__)],
                                   dict(zip(p.classes, row))))
        if progress:
            progress(len(rows), len(images))
    return Predictions(str(checkpoint), p.method, list(p.classes), rows)


def write_predictions(result: Predictions, out: Path) -> None:
    """``.json``: the whole result; ``.csv``: image, prediction, one probability column per class."""
    check_output(out)
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(result.as_dict(), indent=2))
        return
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prediction", *result.classes])
        for row in result.rows:
            writer.writerow([row.image, row.prediction, *(row.probabilities[c] for c in result.classes)])


def check_output(out: Path) -> None:
    """Refuse an --out format we cannot write, and make its folder (as ``fpt evaluate`` does), before any work is
    done."""
    if out.suffix.lower() not in (".csv", ".json"):
        raise FptError(f"--out {out}: write .csv or .json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FptError(f"--out {out}: cannot create its folder ({e.strerror})") from None
