"""fpt show: the stored selection drawn per layer/head, and the prompts' attention over it computed from the
checkpoint's fusion module (softmax(LN(p) · K / sqrt(d)), averaged over prompts)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from fpt import FptError
from fpt.cli import app
from fpt.config import train_config
from fpt.store import StoreReader
from fpt.train import train
from fpt.train.show import GREEN, LABEL_H, TokenMaps, find_sample, render_tile, show, token_maps
from tests.conftest import micro_config, write_image_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from fpt.extract import extract

    root = tmp_path_factory.mktemp("show")
    store = root / "micro.zarr"
    extract(micro_config(write_image_folder(root / "data"), store))
    for method in ("fpt+", "side-only"):
        train(train_config(store, None, out=root / method, side_res=16, epochs=1, batch_size=4, prompts=3,
                           device="cpu", method=method))
    return store, root


def test_attention_is_the_prompts_softmax_over_the_stored_keys(trained):
    store, root = trained
    maps = token_maps(store, "test/malignant/001.png", root / "fpt+" / "best.pt")
    fusion = torch.load(root / "fpt+" / "best.pt", weights_only=True)["model"]
    prompts = fusion["fusion.prompts"]                                       # [L, P, D]
    q = F.layer_norm(prompts, (32,), fusion["fusion.norm.weight"], fusion["fusion.norm.bias"])
    reader = StoreReader(store)
    keys = torch.from_numpy(reader.read([maps.sample], ("keys",))["keys"][0]).float()   # [L, H, k, d]
    for layer in range(2):
        for head in range(2):
            qh = q[layer, :, head * 16:(head + 1) * 16]                       # [P, d]
            want = torch.softmax(qh @ keys[layer, head].T / 4.0, dim=-1).mean(0)
            np.testing.assert_allclose(maps.attention[layer, head], want.numpy(), rtol=1e-5, atol=1e-6)
    assert maps.label == "malignant" and maps.grid == 8 and maps.layers == [2, 3]
    np.testing.assert_array_equal(maps.indices, reader.read([maps.sample], ("indices",))["indices"][0])


def test_tile_boxes_exactly_the_selected_tokens(trained):
    store, _ = trained
    maps = token_maps(store, "5")
    tile = render_tile(maps, 1, 0, 64, attention=False)                     # 8 px per token
    pixels = np.asarray(tile)
    chosen = {int(p) - maps.prefix for p in maps.indices[1, 0] if p >= maps.prefix}
    for patch in range(64):
        row, col = divmod(patch, 8)
        corner = tuple(pixels[row * 8, col * 8])
        assert (corner == GREEN) == (patch in chosen), patch
    base = np.asarray(Image.fromarray(maps.image).resize((64, 64), Image.Resampling.BICUBIC)).astype(int)
    inside = [(r * 8 + 4, c * 8 + 4) for r, c in (divmod(p, 8) for p in range(64))]
    for patch, (y, x) in enumerate(inside):                                  # unselected tokens are dimmed
        kept = patch in chosen
        assert (np.abs(pixels[y, x].astype(int) - base[y, x]).max() <= 1) == kept


def test_tiles_box_the_patch_each_token_is_after_all_the_prefix_tokens():
    """Token i >= prefix is patch i - prefix (row-major over the grid), whatever the number of prefix tokens: a
    DINOv2 with registers has 5 (class + 4 registers), and a box placed as if only a class token came first sits
    4 patches off. The store's micro LPM has one prefix token, so these maps are made here."""
    grid, prefix, cell = 4, 5, 16
    chosen = [0, 3, 6, 9, 15]                                                # patches, row-major
    indices = np.array([[[1] + [p + prefix for p in chosen]]])               # [L=1, H=1, k]: a register and those
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    maps = TokenMaps(sample=0, sample_id="x.png", label="benign", image=image, layers=[0], indices=indices,
                     attention=None, grid=grid, prefix=prefix)
    pixels = np.asarray(render_tile(maps, 0, 0, grid * cell, attention=False))
    for patch in range(grid * grid):
        row, col = divmod(patch, grid)
        assert (tuple(pixels[row * cell, col * cell]) == GREEN) == (patch in chosen), patch


def test_show_writes_the_grid_png(trained, tmp_path):
    store, root = trained
    out = show(store, "test/benign/000.png", tmp_path / "a.png", root / "fpt+" / "best.pt", layers="all", tile=48)
    assert Image.open(out).size == ((1 + 2) * 48, 2 * 2 * (48 + LABEL_H))    # 2 heads; 2 layers x (selected, prompts)
    out = show(store, "0", tmp_path / "b.png", heads="1", tile=48)
    assert Image.open(out).size == (2 * 48, 48 + LABEL_H)                    # top layer, one head, no checkpoint


def test_show_refusals(trained, tmp_path):
    store, root = trained
    with pytest.raises(FptError, match="did you mean train/benign/000.png, val/benign/000.png"):
        find_sample(StoreReader(store), "benign/000")
    with pytest.raises(FptError, match="no prompts to show attention of"):
        show(store, "0", tmp_path / "x.png", root / "side-only" / "best.pt")
    with pytest.raises(FptError, match="--layer 7: choose from"):
        show(store, "0", tmp_path / "x.png", layers="7")
    with pytest.raises(FptError, match="is a .png"):
        show(store, "0", tmp_path / "x.jpg")
    result = CliRunner().invoke(app, ["show", "--store", str(store), "--sample", "nope",
                                      "--out", str(tmp_path / "y.png")])
    assert result.exit_code == 2 and "is not in" in result.output and "Traceback" not in result.output
    ok = CliRunner().invoke(app, ["show", "--store", str(store), "--sample", "3", "--checkpoint",
                                  str(root / "fpt+" / "best.pt"), "--out", str(tmp_path / "z.png")])
    assert ok.exit_code == 0 and (tmp_path / "z.png").exists(), ok.output


def test_a_skipped_sample_or_an_odd_number_is_refused(tmp_path):
    """A source skipped at extraction (--on-error skip) holds only the LPM's output for a blank image: nothing to
    draw. A sample written with digits that are not decimal ones ('²') is an unknown id, not a crash."""
    from fpt.extract import extract

    data = write_image_folder(tmp_path / "data")
    (data / "test" / "benign" / "000.png").write_bytes(b"not an image")
    store = tmp_path / "skip.zarr"
    extract(micro_config(data, store, on_error="skip"))
    with pytest.raises(FptError, match="could not be read at extraction and was skipped"):
        show(store, "test/benign/000.png", tmp_path / "x.png")
    with pytest.raises(FptError, match="is not in"):
        show(store, "²", tmp_path / "x.png")
