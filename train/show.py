"""``fpt show``: what the LPM looked at for one stored sample (the paper's Fig. 9).

For each chosen LPM layer and head: the image with the important tokens the store kept (green boxes; the rest
dimmed), and, with a checkpoint of a prompt method, the fine-grained prompts' attention over those tokens
(softmax(q · K / sqrt(d)) with the fusion module's query, averaged over the prompts) as a heat overlay.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from fpt import FptError
from fpt.store import EXCLUDED_SPLIT, StoreReader, store_stem
from fpt.train.loop import load_checkpoint
from fpt.train.model import SideNetwork, prompt_attention

LABEL_H = 14          # pixels of caption above each tile
GREEN = (0, 230, 0)


@dataclass
class TokenMaps:
    """One sample's selection and (optionally) the prompts' attention over it."""
    sample: int
    sample_id: str
    label: str
    image: np.ndarray              # uint8 [R, R, 3], the stored low-res copy
    layers: list[int]              # LPM layer numbers of the store's layers
    indices: np.ndarray            # int [L, H, k] token positions (0.. prefix-1 = class/prefix tokens)
    attention: np.ndarray | None   # float [L, H, k]: mean over prompts of their attention; None without prompts
    grid: int                      # patches per side at the LPM's resolution
    prefix: int                    # prefix (class) tokens before the patches


def find_sample(reader: StoreReader, sample: str) -> int:
    """A sample by its id (e.g. ``test/malignant/003.png``) or its row number in the store."""
    ids = list(reader.ids)
    if sample in ids:
        return ids.index(sample)
    if sample.isdecimal() and int(sample) < len(ids):
        return int(sample)
    close = [i for i in ids if sample in i][:3]
    raise FptError(f"--sample {sample!r} is not in {reader.path}" + (f"; did you mean {', '.join(close)}?" if close
                   else f" (ids look like {ids[0]}; or give a row number 0-{len(ids) - 1})"))


def token_maps(store: Path, sample: str, checkpoint: Path | None = None) -> TokenMaps:
    reader = StoreReader(store)
    index = find_sample(reader, sample)
    if not reader.done()[index]:
        raise FptError(f"sample {sample!r} is not extracted yet; finish the store with `fpt extract`")
    if reader.split[index] == EXCLUDED_SPLIT:
        raise FptError(f"sample {reader.ids[index]} (row {index}) could not be read at extraction and was skipped "
                       f"(listed in {reader.path}/skipped.csv): the store holds nothing of it to show")
    arrays = reader.read([index], ("images", "indices", "keys"))
    attention = None
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint, reader)
        fusion = ckpt.model.fusion if isinstance(ckpt.model, SideNetwork) else None
        if fusion is None:
            raise FptError(f"{checkpoint} is a {ckpt.spec.method} model: it has no prompts to show attention of")
        with torch.no_grad():
            keys = torch.from_numpy(arrays["keys"]).float()                       # [1, L, H, k, d]
            attention = prompt_attention(fusion.query(), keys)[0].mean(dim=2).numpy()   # [L, H, k]
    bb, ex = reader.attrs["backbone"], reader.attrs["extraction"]
    return TokenMaps(sample=index, sample_id=str(reader.ids[index]), label=reader.classes[int(arrays["labels"][0])],
                     image=arrays["images"][0], layers=list(ex["layers"]), indices=arrays["indices"][0],
                     attention=attention, grid=ex["res"] // bb["patch_size"], prefix=bb.get("prefix_tokens", 1))


def parse_choice(text: str | None, allowed: list[int], what: str, default: list[int]) -> list[int]:
    """``None`` -> default, ``all`` -> allowed, ``"6,11"`` -> [6, 11] (each must be allowed)."""
    if text is None:
        return default
    if text == "all":
        return allowed
    try:
        chosen = [int(v) for v in text.split(",")]
    except ValueError:
        raise FptError(f"--{what} {text!r}: expected all or numbers like 0,3") from None
    bad = [c for c in chosen if c not in allowed]
    if bad:
        raise FptError(f"--{what} {bad[0]}: choose from {allowed[0]}-{allowed[-1]}" if allowed == list(
            range(allowed[0], allowed[-1] + 1)) else f"--{what} {bad[0]}: choose from {allowed}")
    return chosen


def _cell_box(position: int, maps: TokenMaps, tile: int) -> tuple[int, int, int, int]:
    row, col = divmod(position - maps.prefix, maps.grid)
    cell = tile / maps.grid
    return (round(col * cell), round(row * cell), round((col + 1) * cell) - 1, round((row + 1) * cell) - 1)


def render_tile(maps: TokenMaps, layer: int, head: int, tile: int, attention: bool) -> Image.Image:
    """The image at ``tile`` px with head ``head`` of store layer ``layer``: unselected tokens dimmed; selected
    ones boxed green, or (``attention``) tinted red-to-yellow by the prompts' attention relative to its max."""
    base = Image.fromarray(maps.image).convert("RGB").resize((tile, tile), Image.Resampling.BICUBIC)
    dim = Image.blend(base, Image.new("RGB", base.size), 0.65)
    selected = Image.new("L", base.size, 0)
    mask_draw = ImageDraw.Draw(selected)
    patches = [int(p) for p in maps.indices[layer, head] if p >= maps.prefix]
    for p in patches:
        mask_draw.rectangle(_cell_box(p, maps, tile), fill=255)
    out = Image.composite(base, dim, selected)
    draw = ImageDraw.Draw(out, "RGBA")
    if attention:
        weights = maps.attention[layer, head]
        top = float(weights.max()) or 1.0
        for p, w in zip(maps.indices[layer, head], weights):
            if p >= maps.prefix:
                s = float(w) / top
                draw.rectangle(_cell_box(int(p), maps, tile), fill=(255, int(255 * s), 0, int(60 + 140 * s)))
    else:
        for p in patches:
            draw.rectangle(_cell_box(p, maps, tile), outline=GREEN)
    if len(patches) < maps.indices.shape[-1]:                 # a prefix (class) token is among the selected
        draw.text((2, tile - 12), "+cls", fill=GREEN)
    return out


def render(maps: TokenMaps, layers: list[int], heads: list[int], tile: int = 192) -> Image.Image:
    """A grid: first column the image; then one column per head; per layer a row of selections and, with
    attention, a row of the prompts' attention."""
    kinds = ["selected"] + (["prompts"] if maps.attention is not None else [])
    rows = [(layer, kind) for layer in layers for kind in kinds]
    sheet = Image.new("RGB", ((1 + len(heads)) * tile, len(rows) * (tile + LABEL_H)), "white")
    draw = ImageDraw.Draw(sheet)
    image = Image.fromarray(maps.image).convert("RGB").resize((tile, tile), Image.Resampling.BICUBIC)
    for r, (layer, kind) in enumerate(rows):
        y = r * (tile + LABEL_H)
        store_layer = maps.layers.index(layer)
        draw.text((2, y + 1), f"{maps.label}: {maps.sample_id}"[:tile // 6], fill="black")
        sheet.paste(image, (0, y + LABEL_H))
        for c, head in enumerate(heads, start=1):
            draw.text((c * tile + 2, y + 1), f"layer {layer} head {head}: {kind}", fill="black")
            sheet.paste(render_tile(maps, store_layer, head, tile, kind == "prompts"), (c * tile, y + LABEL_H))
    return sheet


def show(store: Path, sample: str, out: Path | None = None, checkpoint: Path | None = None,
         layers: str | None = None, heads: str | None = None, tile: int = 192) -> Path:
    """Write the token map PNG of one sample; returns its path (default ``<store name>-<sample row>.png``)."""
    if not 32 <= tile <= 2048:
        raise FptError(f"--tile {tile}: from 32 to 2048 px")
    if out is not None and out.suffix.lower() != ".png":
        raise FptError(f"--out {out}: the token map is a .png")
    maps = token_maps(store, sample, checkpoint)
    chosen_layers = parse_choice(layers, maps.layers, "layer", [maps.layers[-1]])
    chosen_heads = parse_choice(heads, list(range(maps.indices.shape[1])), "head", list(range(maps.indices.shape[1])))
    out = out or Path(f"{store_stem(store)}-{maps.sample}.png")
    out.parent.mkdir(parents=True, exist_ok=True)           # as evaluate and predict make theirs
    render(maps, chosen_layers, chosen_heads, tile).save(out)
    return out
