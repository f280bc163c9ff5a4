"""Problems that used to pass silently are loud: an unfinished store, 0-255 normalisation, a class without train
(or val/test) samples, labels spelt two ways. A damaged store is repaired by re-extracting exactly its damaged
shards. A store of another extraction is refused naming the changed option, before the LPM is loaded."""
import json
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import zarr

from fpt import FptError
from fpt.config import extract_config
from fpt.extract import extract
from fpt.extract import run as extract_run
from fpt.extract.datasets import open_source
from fpt.store import StoreReader, StoreWriter, check_same_extraction, verify
from tests.conftest import micro_config, write_image_folder
from tests.helpers import MICRO_ARGS, assert_same_store, fails_cleanly, flip, run, shard_file, write_manifest


@pytest.fixture
def no_lpm(monkeypatch):
    """Loading the LPM fails the test: proves a refusal came before the expensive part."""
    def refuse(*_):
        raise AssertionError("the LPM was loaded")
    monkeypatch.setattr(extract_run, "load_lpm", refuse)


def one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    return lines[-1]


def test_verify_fails_on_an_unfinished_store_saying_how_to_finish(image_folder, tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"
    real = StoreWriter.write_shard

    def die_after_two_shards(self, shard, *a, **k):
        if shard >= 2:
            raise KeyboardInterrupt
        real(self, shard, *a, **k)

    monkeypatch.setattr(StoreWriter, "write_shard", die_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        extract(micro_config(image_folder, store))
    monkeypatch.undo()
    report = verify(store)
    assert not report.ok and report.not_extracted.tolist() == list(range(8, 16)) and len(report.damaged) == 0
    result = run(["store", "verify", str(store)])
    assert result.exit_code == 1
    line = " ".join(result.output.split())
    assert "8 of 16 samples are not extracted yet" in line and "re-run the same `fpt extract` command" in line
    extract(micro_config(image_folder, store))                  # the advice works
    assert verify(store).ok and run(["store", "verify", str(store)]).exit_code == 0


@pytest.mark.parametrize("option, values, message", [
    ("--mean", "123,116,103", "--mean 123,116,103: every value must be in [0, 1]"),
    ("--mean", "-0.1", "must be in [0, 1]"),
    ("--std", "58,57,57", "--std 58,57,57: every value must be in (0, 1]"),
    ("--std", "0,0.2,0.2", "must be in (0, 1]"),
])
def test_normalisation_off_the_unit_scale_is_refused(image_folder, tmp_path, option, values, message):
    text = fails_cleanly(["extract", "--data", str(image_folder), *MICRO_ARGS, "--out", str(tmp_path / "s.zarr"),
                          option, values], message)
    assert "0.485,0.456,0.406" in " ".join(text.split())          # says the scale, by example
    assert not (tmp_path / "s.zarr").exists()
    extract_config(None, image_folder, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))   # the scale is fine


def test_res_that_misses_the_patch_is_refused_from_the_name_alone(image_folder):
    with pytest.raises(FptError, match="--res 500 is not a multiple of the patch size 16 of vit_base_patch16_224"):
        extract_config(None, image_folder, backbone="vit_base_patch16_224", res=500)


def test_class_without_train_images_is_refused_before_the_lpm_loads(tmp_path, no_lpm):
    data = write_image_folder(tmp_path / "d")
    (data / "train" / "normal").mkdir()                         # an empty class folder
    with pytest.raises(FptError, match="'normal' have no train samples.*empty class folder"):
        extract(micro_config(data, tmp_path / "s.zarr"))
    rows = [{"path": f"i/{i}.png", "label": "a" if i % 2 else "b", "split": "train"} for i in range(4)]
    rows += [{"path": "i/v.png", "label": "a", "split": "val"}, {"path": "i/t.png", "label": "c", "split": "test"}]
    manifest = write_manifest(tmp_path / "m", rows, ("path", "label", "split"))
    with pytest.raises(FptError, match="'c' have no train samples"):
        extract(micro_config(manifest, tmp_path / "m.zarr"))


def test_class_missing_from_val_or_test_warns_and_is_recorded(tmp_path):
    data = write_image_folder(tmp_path / "d")
    shutil.rmtree(data / "val" / "malignant")
    shutil.rmtree(data / "test" / "benign")
    store = tmp_path / "s.zarr"
    warned = []
    extract(micro_config(data, store), warn=warned.append)
    assert len(warned) == 2 and "'malignant' have no val samples, so val AUC is undefined" in warned[0]
    assert "'benign' have no test samples" in warned[1]
    assert StoreReader(store).attrs["dataset"]["warnings"] == warned
    from fpt.config import train_config
    from fpt.train import train
    metrics = train(train_config(store, None, out=tmp_path / "run", side_res=16, epochs=1, batch_size=4, prompts=3,
                                 device="cpu"))
    assert metrics.data["dataset_warnings"] == warned                   # carried into metrics.json
    cli = run(["extract", "--data", str(data), *MICRO_ARGS, "--out", str(tmp_path / "c.zarr")])
    assert cli.exit_code == 0 and "WARNING" in cli.output and "no val samples" in " ".join(cli.output.split())
    shown = run(["inspect", str(store), "--quick"])
    assert shown.exit_code == 0 and "no test samples" in " ".join(shown.output.split())


def test_labels_differing_only_in_case_are_refused(tmp_path, no_lpm):
    rows = [{"path": f"i/{i}.png", "label": ["benign", "Benign", "malignant"][i % 3]} for i in range(30)]
    manifest = write_manifest(tmp_path / "m", rows, ("path", "label"))
    with pytest.raises(FptError, match="classes 'Benign' and 'benign' differ only in case"):
        extract(micro_config(manifest, tmp_path / "m.zarr"))
    rows = [{**r, "label": f"  {r['label'].lower()} "} for r in rows]     # surrounding spaces: one class
    manifest = write_manifest(tmp_path / "n", rows, ("path", "label"))
    assert extract_config(None, manifest).name == "manifest"
    from fpt.extract.datasets import open_source
    assert open_source(extract_config(None, manifest)).classes == ["benign", "malignant"]
    data = write_image_folder(tmp_path / "d", classes=("benign", "Benign"))
    with pytest.raises(FptError, match="differ only in case"):
        extract(micro_config(data, tmp_path / "d.zarr"))


def test_corrupt_chunk_is_repaired_by_reextracting_exactly_its_shard(micro_store, tmp_path):
    pristine = tmp_path / "pristine.zarr"
    shutil.copytree(micro_store, pristine)
    flip(shard_file(micro_store, "keys", 1), 40)                # shard 1's chunk: samples 4-7
    flip(shard_file(micro_store, "done", 3), 30)                # the done flags of shard 3
    report = verify(micro_store)
    assert sorted((p.array, tuple(p.samples)) for p in report.problems) == [("done", (12, 13, 14, 15)),
                                                                           ("keys", (4, 5, 6, 7))]
    ids = StoreReader(pristine).ids
    result = run(["store", "verify", str(micro_store), "--repair"])
    assert result.exit_code == 1 and ids[4] in result.output and "marked 2 shard(s) for re-extraction" in result.output
    assert verify(micro_store).not_extracted.tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    again = extract(micro_config(micro_store.parent / "data", micro_store))
    assert again.n_written == 8                                 # the two marked shards, nothing else
    assert verify(micro_store).ok
    assert_same_store(micro_store, pristine)


def test_damage_reextraction_cannot_fix_is_refused_with_the_fix(micro_store):
    flip(shard_file(micro_store, "labels", 0), 20)
    result = run(["store", "verify", str(micro_store), "--repair"])
    assert result.exit_code == 2 and "labels is damaged" in result.output and "--overwrite" in result.output


def test_refusal_names_the_changed_setting_before_loading_the_lpm(micro_store, image_folder, no_lpm):
    for change, named in [(dict(res=128), "extraction.res: stored 64, requested 128"),
                          (dict(token_ratio=0.5), "extraction.token_ratio"),
                          (dict(mean=(0.1, 0.1, 0.1)), "normalization.mean"),
                          (dict(layers=[0, 1]), "extraction.layers: stored [2, 3], requested [0, 1]"),
                          (dict(j2k_decode="reduced"), "extraction.j2k_decode: stored 'full', requested 'reduced'")]:
        with pytest.raises(FptError, match=re.escape(f"different extraction ({named}")):
            extract(micro_config(image_folder, micro_store, **change))
    # a store written before j2k_decode was recorded decoded JPEG 2000 in full: resumed as such, never reduced
    group = zarr.open_group(micro_store, mode="r+")
    group.attrs["extraction"] = {k: v for k, v in group.attrs["extraction"].items() if k != "j2k_decode"}
    with pytest.raises(FptError, match=re.escape("extraction.j2k_decode: stored 'full', requested 'reduced'")):
        extract(micro_config(image_folder, micro_store, j2k_decode="reduced"))
    full = replace(micro_config(image_folder, micro_store), precision="fp32")   # as extract() resolves it here
    source = open_source(full)
    check_same_extraction(micro_store, extract_run.settings_attrs(full, source, []), [s.id for s in source.samples])
    (image_folder / "train" / "benign" / "000.png").rename(image_folder / "train" / "benign" / "100.png")
    extract_run._SOURCES.clear()                         # forget the listing of the unchanged folder
    with pytest.raises(FptError, match="sample ids differ"):
        extract(micro_config(image_folder, micro_store))


def test_old_schema_stores_are_refused_with_the_fix(micro_store):
    meta = json.loads((micro_store / "zarr.json").read_text())
    meta["attributes"]["fpt_store_version"] = 1
    (micro_store / "zarr.json").write_text(json.dumps(meta))
    for args in (["inspect", str(micro_store)], ["store", "verify", str(micro_store)]):
        result = run(args)
        assert result.exit_code == 2 and "schema version 1, this fpt reads version 2" in " ".join(result.output.split())
        assert "--overwrite" in result.output
    assert zarr.open_group(micro_store, mode="r")["ids"].dtype == np.uint8
