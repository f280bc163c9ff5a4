"""What a newcomer reads: --help with a description, a default and a group for every option, no type on flags,
--version, one-line pointers instead of parser boxes, progress inside an epoch, tables that fit 80 columns."""
import re

import pytest
from rich.console import Console
from typer.main import get_command
from typer.testing import CliRunner

from fpt import __version__, cli
from fpt.cli import app
from fpt.config import extract_config, low_res_warnings, pipeline_entry
from tests.conftest import MICRO

runner = CliRunner()
COMMANDS = ["extract", "train", "sweep", "evaluate", "predict", "show", "inspect", "demo"]
GROUPED = ["extract", "train", "sweep", "evaluate", "predict"]        # the others have three options or so


def commands():
    group = get_command(app)
    return {name: group.commands[name] for name in COMMANDS}


def test_every_option_has_a_description_and_a_group():
    for name, command in commands().items():
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help and len(param.help) > 10, f"{name} {param.opts}"
                if name in GROUPED:
                    assert getattr(param, "rich_help_panel", None), f"{name} {param.opts} has no group"


@pytest.mark.parametrize("command,section,options", [
    ("extract", "extract", ["res", "backbone", "token_ratio", "importance", "image_res", "device"]),
    ("train", "train", ["side_res", "prompts", "reduction", "epochs", "batch_size", "weight_decay", "seed",
                        "method", "cache", "device"]),
    ("sweep", "train", ["side_res", "prompts", "reduction", "epochs", "batch_size", "seed", "method"]),
])
def test_help_shows_the_pipeline_defaults(command, section, options):
    defaults = pipeline_entry(None)[section]
    help_text = " ".join(runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output.split())
    for option in options:
        value = defaults[option]
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        flag = "--" + option.replace("_", "-")
        assert re.search(rf"{flag} .*?\[default: {re.escape(shown)}\]", help_text), (flag, shown)


def test_help_groups_options_and_shows_no_type_on_flags():
    for name in [*COMMANDS, "store verify"]:
        result = runner.invoke(app, [*name.split(), "--help"], env={"COLUMNS": "120"})
        assert result.exit_code == 0 and "<bool>" not in result.output, name
    extract_help = runner.invoke(app, ["extract", "--help"], env={"COLUMNS": "120"}).output
    for group in ("Data", "LPM", "Token selection", "Output", "Hardware"):
        assert f"─ {group}" in extract_help
    train_help = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "120"}).output
    for group in ("Side network", "Training"):
        assert f"─ {group}" in train_help


def test_train_and_sweep_share_their_option_declarations():
    train, sweep = commands()["train"], commands()["sweep"]
    shared = {p.name: p.help for p in train.params} .keys() & {p.name for p in sweep.params}
    assert {"side_res", "prompts", "method", "epochs", "device", "skip_corrupt"} <= shared
    for name in shared - {"lr", "weight_decay", "out"}:          # grid vs single value, run vs sweep dir
        t = next(p for p in train.params if p.name == name)
        s = next(p for p in sweep.params if p.name == name)
        assert (t.help, t.rich_help_panel) == (s.help, s.rich_help_panel), name


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith(f"fpt {__version__} (torch ")


@pytest.mark.parametrize("option", ["--lr", "--weight-decay"])
def test_a_grid_given_to_train_points_to_sweep_in_one_line(option, tmp_path):
    result = runner.invoke(app, ["train", "--store", str(tmp_path / "none.zarr"), option, "1e-3,5e-3"])
    assert result.exit_code == 2 and "╭" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith("error:") and "fpt sweep" in line and f"{option} 1e-3,5e-3" in line


def test_low_res_copy_warnings(image_folder, tmp_path):
    cfg = lambda **o: extract_config(None, image_folder, backbone=MICRO, random_init=True, **o)  # noqa: E731
    side = pipeline_entry(None)["train"]["side_res"]
    assert low_res_warnings(cfg(res=512, image_res=256)) == []
    (upsampled,) = low_res_warnings(cfg(res=224, image_res=side * 2))
    assert "upsampled" in upsampled and "--res 224" in upsampled
    (small,) = low_res_warnings(cfg(res=512, image_res=side // 2))
    assert f"--side-res {side // 2}" in small
    result = runner.invoke(app, ["extract", "--data", str(image_folder), "--backbone", MICRO, "--random-init",
                                 "--res", "64", "--image-res", "96", "--device", "cpu", "--out",
                                 str(tmp_path / "s.zarr")])
    assert result.exit_code == 0, result.output
    assert "WARNING: --image-res 96 is larger than --res 64" in " ".join(result.output.split())


def test_low_res_copy_is_measured_against_the_side_input_of_the_given_pipelines_file(image_folder, tmp_path):
    """A --pipelines file that raises the side network's input makes a copy that fits the packaged one too small."""
    side = pipeline_entry(None)["train"]["side_res"]
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"defaults:\n  train: {{side_res: {side * 2}}}\n")
    cfg = extract_config(None, image_folder, mine, backbone=MICRO, random_init=True, res=side * 4, image_res=side)
    assert low_res_warnings(cfg) == []
    (small,) = low_res_warnings(cfg, mine)
    assert f"default input ({side * 2} px)" in small
    result = runner.invoke(app, ["extract", "--data", str(image_folder), "--backbone", MICRO, "--random-init",
                                 "--res", "64", "--image-res", "32", "--device", "cpu", "--pipelines", str(mine),
                                 "--out", str(tmp_path / "s.zarr")])
    assert result.exit_code == 0, result.output
    assert f"side network's default input ({side * 2} px)" in " ".join(result.output.split())


def test_training_reports_every_batch(micro_store, tmp_path):
    from fpt.config import train_config
    from fpt.train import train

    seen = []
    train(train_config(micro_store, side_res=16, epochs=2, batch_size=3, device="cpu", out=tmp_path / "run"),
          on_batch=lambda epoch, done, total: seen.append((epoch, done, total)))
    assert seen == [(e, i, 2) for e in range(2) for i in (1, 2)]     # 8 train samples: 2 full batches of 3


def test_inspect_arrays_fit_80_columns(micro_store, monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=80, record=True))
    result = runner.invoke(app, ["inspect", str(micro_store)])
    assert result.exit_code == 0, result.output
    text = cli.console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text.split("arrays")[-1]
    assert str(micro_store)[-20:] in text.replace("\n", "").replace(" ", "")     # long paths wrap, whole
    rows = {line.split()[0]: line for line in text.split("arrays")[-1].splitlines() if line.strip()}
    for name, dtype in [("keys", "float16"), ("values", "float16"), ("indices", "int32"), ("images", "uint8"),
                        ("cls", "float16"), ("labels", "int16")]:
        assert dtype in rows[name] and "blosc crc32c" in rows[name] and re.search(r"\d+(\.\d)? [KM]?B\s*$", rows[name])
