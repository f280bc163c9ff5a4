"""Config merge: defaults <- pipeline entry <- CLI options."""
import pytest

from fpt import FptError
from fpt.config import extract_config, parse_floats, parse_layers, pipeline_entry, train_config


def test_parse_layers():
    assert parse_layers("6-11") == [6, 7, 8, 9, 10, 11]
    assert parse_layers("6,8,10") == [6, 8, 10]
    assert parse_layers("1,3-4") == [1, 3, 4]
    assert parse_layers(None) is None
    for bad in ("a-b", "8,6", "3,3"):
        with pytest.raises(FptError):
            parse_layers(bad)


def test_parse_floats():
    assert parse_floats("0.5", "mean") == (0.5, 0.5, 0.5)
    assert parse_floats("0.1,0.2,0.3", "std") == (0.1, 0.2, 0.3)
    with pytest.raises(FptError, match="--std"):
        parse_floats("1,2", "std")


def test_precedence_defaults_entry_cli(tmp_path, monkeypatch):
    demo = extract_config("demo")
    assert demo.backbone == "vit_tiny_patch16_224" and demo.res == 256          # entry over defaults
    assert demo.token_ratio == 0.2 and demo.out == "demo.zarr"            # defaults
    assert extract_config("demo", res=512, token_ratio=0.3).res == 512           # CLI over entry
    monkeypatch.setenv("FPT_DATA_CMMD", str(tmp_path))
    cmmd = extract_config("cmmd")
    assert cmmd.data == tmp_path and cmmd.classes == ["benign", "malignant"] and cmmd.res == 512
    assert train_config("x.zarr", "cmmd").lr == pipeline_entry("cmmd")["train"]["lr"]
    assert train_config("x.zarr", "cmmd", lr=0.1).lr == 0.1
    assert train_config("x.zarr", "not-a-pipeline").side_res == 128


def test_every_paper_dataset_has_a_pipeline():
    for name in ("cmmd", "ddsm", "messidor2", "ddr", "isic2016", "isic2018", "covid", "chncxr"):
        entry = pipeline_entry(name)
        assert entry["classes"] and len(entry["mean"]) == 3 and entry["train"]["lr"] > 0
        assert entry["extract"]["res"] == 512 and entry["train"]["side_res"] == 128
