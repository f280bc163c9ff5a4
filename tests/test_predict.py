"""fpt predict: images -> the store's LPM preprocessing and selection -> the trained model gives exactly the
probabilities the store's samples get; wrong LPM weights are refused; inputs from files, folders and CSVs."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fpt import FptError
from fpt.cli import app
from fpt.config import train_config
from fpt.store import StoreReader
from fpt.train import load_checkpoint, train
from fpt.train.data import SideInput, open_split
from fpt.train.loop import predict_split
from fpt.predict import collect_images, load_predictor, predict_images
from tests.conftest import MICRO, micro_config, write_image_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store and one checkpoint per method trained on it."""
    from fpt.extract import extract

    root = tmp_path_factory.mktemp("predict")
    data = write_image_folder(root / "data")
    store = root / "micro.zarr"
    extract(micro_config(data, store))
    checkpoints = {}
    for method in ("fpt+", "fpt", "side-only", "linear-probe"):
        train(train_config(store, None, out=root / method, side_res=16, epochs=1, batch_size=4, prompts=3,
                           device="cpu", method=method))
        checkpoints[method] = root / method / "best.pt"
    return data, store, checkpoints


@pytest.mark.parametrize("method", ["fpt+", "fpt", "side-only", "linear-probe"])
def test_predict_gives_the_store_samples_probabilities(trained, method):
    data, store, checkpoints = trained
    result = predict_images(checkpoints[method], [data / "test"], random_init=True, device="cpu")
    assert result.method == method and result.classes == ["benign", "malignant"]
    reader = StoreReader(store)
    ckpt = load_checkpoint(checkpoints[method], reader)
    norm = reader.attrs["normalization"]
    split = open_split(reader, "test", ckpt.spec.inputs, "none", torch.device("cpu"))
    want, _ = predict_split(ckpt.model, split, SideInput(ckpt.spec.side_res, norm["mean"], norm["std"]), 4)
    ids = list(reader.ids[reader.split_indices("test")])
    got = {Path(r.image).relative_to(data).as_posix(): [r.probabilities[c] for c in result.classes]
           for r in result.rows}
    assert sorted(got) == sorted(ids)
    np.testing.assert_allclose([got[i] for i in ids], want, rtol=1e-5, atol=1e-6)
    for r in result.rows:
        assert r.prediction == max(r.probabilities, key=r.probabilities.get)


def test_predictions_batch_by_batch_keep_each_images_name_and_probabilities(trained):
    """Images are encoded ``batch_size`` at a time: whatever the batching (several batches, a last partial one),
    each row names its own image, in the order the inputs give them, with the probabilities it gets in one
    batch."""
    data, _, checkpoints = trained
    images = collect_images([data / "test"])
    whole = predict_images(checkpoints["fpt+"], [data / "test"], random_init=True, device="cpu",
                           batch_size=len(images))
    assert [r.image for r in whole.rows] == [str(p) for p in images]
    for size, told in ((1, list(range(1, len(images) + 1))), (len(images) - 1, [len(images) - 1, len(images)])):
        seen = []
        batched = predict_images(checkpoints["fpt+"], [data / "test"], random_init=True, device="cpu",
                                 batch_size=size, progress=lambda done, total: seen.append((done, total)))
        assert seen == [(done, len(images)) for done in told]           # images done after each batch, of all
        assert [r.image for r in batched.rows] == [r.image for r in whole.rows]
        np.testing.assert_allclose([[r.probabilities[c] for c in batched.classes] for r in batched.rows],
                                   [[r.probabilities[c] for c in whole.classes] for r in whole.rows],
                                   rtol=1e-5, atol=1e-6)


def test_other_lpm_weights_are_refused(trained, tmp_path):
    import timm

    data, _, checkpoints = trained
    other = timm.create_model(MICRO, num_classes=0, img_size=64)            # another random init
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(FptError, match="LPM weights .* differ from those the store was extracted with"):
        predict_images(checkpoints["fpt+"], [data / "test"], weights=tmp_path / "other.pt", device="cpu")
    with pytest.raises(FptError, match="exclude each other"):
        predict_images(checkpoints["fpt+"], [data / "test"], weights=tmp_path / "other.pt", random_init=True)


def test_inputs_from_files_folders_and_csv(trained, tmp_path):
    data, _, _ = trained
    folder = sorted((data / "val").rglob("*.png"))
    assert collect_images([data / "val"]) == folder
    listing = data / "list.csv"                                   # relative paths: relative to the CSV's folder
    listing.write_text("path,note\n" + "".join(f"{p.relative_to(data)},x\n" for p in folder[:2]))
    assert collect_images([listing, folder[3]]) == [*folder[:2], folder[3]]
    bare = tmp_path / "bare.csv"
    bare.write_text(f"{folder[0]}\n")
    assert collect_images([bare]) == [folder[0]]
    (tmp_path / "bad.csv").write_text("path\nnope.png\n")
    with pytest.raises(FptError, match="1 listed image\\(s\\) do not exist"):
        collect_images([tmp_path / "bad.csv"])
    with pytest.raises(FptError, match="no such file or folder"):
        collect_images([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FptError, match="no images"):
        collect_images([tmp_path / "empty"])


def test_a_csv_saved_by_a_spreadsheet_is_read_by_its_header(trained, tmp_path):
    """Spreadsheets save a CSV as UTF-8 with a byte-order mark, CRLF line ends and their own header case: the
    header still names the path column (a mark left on the first header cell would make it a path to a file)."""
    data, _, _ = trained
    folder = sorted((data / "val").rglob("*.png"))
    listing = tmp_path / "saved-by-a-spreadsheet.csv"
    listing.write_bytes(("Image,Note\r\n" + "".join(f"{p},x\r\n" for p in folder[:2])).encode("utf-8-sig"))
    assert collect_images([listing]) == folder[:2]


def test_blank_and_short_csv_rows_list_no_image(trained, tmp_path):
    """Blank lines (a spreadsheet's trailing ones) and rows without the path column are passed over, with the
    path column named by the header or the first one."""
    data, _, _ = trained
    folder = sorted((data / "val").rglob("*.png"))
    named = tmp_path / "named.csv"
    named.write_text(f"note,path\n\nonly a note\nx,{folder[0]}\n\n")
    assert collect_images([named]) == [folder[0]]
    bare = tmp_path / "bare.csv"
    bare.write_text(f"{folder[1]}\n\n,\n{folder[2]}\n")
    assert collect_images([bare]) == folder[1:3]


def test_lpm_weights_are_asked_for_as_the_store_was_extracted():
    """Without --weights or --random-init, fpt predict would fetch timm's pretrained weights: allowed only for a
    store extracted from them; weights that are given are checked later, by their sha256."""
    from fpt.predict import check_lpm_weights_given

    check_lpm_weights_given("timm-pretrained", None, False)
    check_lpm_weights_given("file:lpm.pth", Path("lpm.pth"), False)
    check_lpm_weights_given("random-init", None, True)
    with pytest.raises(FptError, match=r"LPM weights file lpm\.pth; pass it with --weights FILE"):
        check_lpm_weights_given("file:lpm.pth", None, False)
    with pytest.raises(FptError, match="random-init LPM; pass --random-init"):
        check_lpm_weights_given("random-init", None, False)


def test_predict_cli_prints_and_writes(trained, tmp_path):
    data, _, checkpoints = trained
    runner = CliRunner()
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(data / "test" / "benign"), "--checkpoint", str(checkpoints["fpt+"]),
                                 "--random-init", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 2 and set(rows[0]) == {"image", "prediction", "benign", "malignant"}
    assert float(rows[0]["benign"]) + float(rows[0]["malignant"]) == pytest.approx(1.0)
    as_json = tmp_path / "p.json"
    assert runner.invoke(app, ["predict", str(data / "test"), "--checkpoint", str(checkpoints["linear-probe"]),
                               "--random-init", "--device", "cpu", "--out", str(as_json)]).exit_code == 0
    assert len(json.loads(as_json.read_text())["rows"]) == 4
    for args, message in [(["--out", str(tmp_path / "p.txt")], "write .csv or .json"),
                          ([], "random-init LPM; pass --random-init"),
                          (["--random-init", "--checkpoint", str(tmp_path / "none.pt")], "no such file")]:
        cmd = ["predict", str(data / "test"), "--checkpoint", str(checkpoints["fpt+"]), "--device", "cpu", *args]
        bad = runner.invoke(app, cmd)
        assert bad.exit_code == 2 and message in " ".join(bad.output.split()), bad.output
        assert "Traceback" not in bad.output


def test_a_random_init_checkpoint_without_random_init_is_refused_before_any_model_loads(trained, monkeypatch):
    import fpt.predict

    data, _, checkpoints = trained

    def no_backbone(*args, **kwargs):
        raise AssertionError("the LPM was built (or downloaded) before the refusal")

    monkeypatch.setattr(fpt.predict, "create_backbone", no_backbone)
    with pytest.raises(FptError, match="random-init LPM; pass --random-init"):
        predict_images(checkpoints["fpt+"], [data / "test"], device="cpu")


def test_reduced_j2k_decoding_reaches_the_store_and_prediction(tmp_path):
    """``--j2k-decode reduced`` on a folder of JPEG 2000 DICOMs: every stored low-res copy is that of the image
    decoded at the coarser level (not the full decode's), the store records it, and ``fpt predict`` decodes the
    same files the same way."""
    from fpt.extract import extract, prepare_image
    from fpt.extract.dicom import read_dicom
    from tests.helpers import j2k_dicom, smooth_stored

    data = tmp_path / "data"
    for split, n in {"train": 3, "val": 1, "test": 2}.items():
        for c, name in enumerate(("benign", "malignant")):
            for i in range(n):
                j2k_dicom(data / split / name / f"{i}.dcm", smooth_stored((256, 200), 12, seed=10 * c + i),
                          window=(2048, 4096))
    extract(micro_config(data, tmp_path / "full.zarr"))               # first in full, in this same process
    store = tmp_path / "j2k.zarr"
    extract(micro_config(data, store, j2k_decode="reduced"))        # res 64: decoded at 128 x 100, not 256 x 200
    reader = StoreReader(store)
    assert reader.attrs["extraction"]["j2k_decode"] == "reduced"
    assert "JPEG 2000 decoded reduced" in " ".join(CliRunner().invoke(app, ["inspect", str(store)]).output.split())
    stored = reader.read(np.arange(len(reader.ids)), ("images",))["images"]
    for sample_id, low in zip(reader.ids, stored):
        np.testing.assert_array_equal(low, prepare_image(read_dicom(data / sample_id, reduce_to=64), 64, 32)[1])
    assert any(not np.array_equal(low, prepare_image(read_dicom(data / i), 64, 32)[1])
               for i, low in zip(reader.ids, stored))

    train(train_config(store, None, out=tmp_path / "run", side_res=16, epochs=1, batch_size=4, device="cpu",
                       method="side-only"))
    predictor = load_predictor(tmp_path / "run" / "best.pt", random_init=True, device="cpu")
    for sample_id, low in zip(reader.ids, stored):                # what predict makes of each file
        np.testing.assert_array_equal(low, prepare_image(predictor.decoding.load(data / sample_id), 64, 32)[1])


def test_the_out_folder_is_made_before_any_work(tmp_path):
    """As ``fpt evaluate`` does: predictions are never computed only to find their folder missing."""
    from fpt.predict import check_output

    check_output(tmp_path / "new" / "p.csv")
    assert (tmp_path / "new").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FptError, match="cannot create its folder"):
        check_output(tmp_path / "file" / "p.csv")
