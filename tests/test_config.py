"""Config merge: defaults <- pipeline entry <- CLI options."""
from dataclasses import fields
from pathlib import Path

import pytest

from fpt import FptError
from fpt.config import (RUNTIME_FIELDS, TrainConfig, extract_config, parse_floats, parse_layers, parse_normalization,
                        pipeline_entry, resume_options, sweep_config, train_config)


def test_parse_layers():
    assert parse_layers("6-11") == [6, 7, 8, 9, 10, 11]
    assert parse_layers("6,8,10") == [6, 8, 10]
    assert parse_layers("1,3-4") == [1, 3, 4]
    assert parse_layers(None) is None
    for bad in ("a-b", "8,6", "3,3", "11-6"):        # a reversed range is no layers at all, not an empty choice
        with pytest.raises(FptError):
            parse_layers(bad)
    for empty in ("", "  "):                        # not taken for the default layers
        with pytest.raises(FptError, match="--layers is empty"):
            parse_layers(empty)


def test_parse_floats():
    assert parse_floats("0.5", "mean") == (0.5, 0.5, 0.5)
    assert parse_floats("0.1,0.2,0.3", "std") == (0.1, 0.2, 0.3)
    with pytest.raises(FptError, match="--std"):
        parse_floats("1,2", "std")


def test_normalization_auto_in_any_case_and_spacing():
    """``--mean Auto`` / ``--std " AUTO "`` are the word auto as the user meant it (train-split statistics), like
    ``auto``; they are not a list of numbers that fails to parse. R,G,B numbers are parse_floats' reading."""
    for text in ("auto", "Auto", "AUTO", " auto "):
        assert parse_normalization(text, "mean") == "auto"
    assert parse_normalization("0.1,0.2,0.3", "std") == parse_floats("0.1,0.2,0.3", "std")
    assert parse_normalization(None, "mean") is None


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
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert demo.random_init and not extract_config("demo", weights=weights).random_init   # given weights win
    with pytest.raises(FptError, match="exclude each other"):                           # unless both are given
        extract_config("demo", weights=weights, random_init=True)
    assert demo.j2k_decode == "full" and extract_config("demo", j2k_decode="reduced").j2k_decode == "reduced"
    with pytest.raises(FptError, match="dataset 'demo' is synthetic .*drop --data"):     # not silently ignored
        extract_config("demo", data=Path("/some/images"))
    with pytest.raises(FptError, match="--j2k-decode 'fast': choose one of full, reduced"):
        extract_config("demo", j2k_decode="fast")


def test_a_named_dataset_keeps_its_name_whatever_its_data_folder_is_called(tmp_path):
    """``--dataset cmmd --data <folder>``: the store is cmmd's (its name is what fpt train and fpt sweep look
    up the dataset's settings by, e.g. its published lr), not named after the folder; only without --dataset
    does the folder's name name it."""
    data = tmp_path / "CMMD-raw"
    data.mkdir()
    cfg = extract_config("cmmd", data)
    assert cfg.name == "cmmd" and cfg.data == data and cfg.out == "cmmd.zarr"
    assert train_config("x.zarr", cfg.name).lr == pipeline_entry("cmmd")["train"]["lr"]
    assert train_config("x.zarr", cfg.name).lr != train_config("x.zarr", data.name).lr
    assert extract_config(None, data).name == "CMMD-raw"


def test_every_paper_dataset_has_a_pipeline():
    for name in ("cmmd", "ddsm", "messidor2", "ddr", "isic2016", "isic2018", "covid", "chncxr"):
        entry = pipeline_entry(name)
        assert entry["classes"] and len(entry["mean"]) == 3 and entry["train"]["lr"] > 0
        assert entry["extract"]["res"] == 512 and entry["train"]["side_res"] == 128


# ---------------------------------------------------------------- configs refuse what they do not know

def test_unknown_options_are_refused_with_the_valid_ones(tmp_path):
    with pytest.raises(FptError, match=r"unknown key 'token_ratoi'; valid: .*token_ratio"):
        extract_config("demo", token_ratoi=0.5)
    with pytest.raises(FptError, match=r"unknown key 'epochz'; valid: .*epochs"):
        train_config("x.zarr", None, epochz=3)
    with pytest.raises(FptError, match=r"unknown key 'epochz'"):
        sweep_config("x.zarr", None, epochz=3)
    with pytest.raises(FptError, match=r"augment: unknown key 'vflp'; valid: .*vflip"):
        train_config("x.zarr", None, augment="paper,vflp=1")


def write_pipelines(path, text):
    path.write_text(text)
    return path


def test_pipelines_file_keys_and_values_are_checked(tmp_path, monkeypatch):
    cases = {
        "pipelines:\n  mine:\n    train: {epochz: 3}\n": r"pipelines.mine.train: unknown key 'epochz'; valid: .*epochs",
        "pipelines:\n  mine:\n    extract: {token_ratoi: 0.1}\n": r"pipelines.mine.extract: unknown key 'token_ratoi'",
        "pipelines:\n  mine:\n    clases: [a, b]\n": r"pipelines.mine: unknown key 'clases'; valid: .*classes",
        "defaults:\n  sweep: {seed: 3}\n": r"defaults.sweep: unknown key 'seed'; valid: .*seeds",
        "pipeline: {}\n": r"unknown key 'pipeline'; valid: defaults, pipelines",
        "pipelines: [a]\n": r"must be a mapping|expected a mapping",
        # values of the wrong type (YAML reads ``lr: 1e-3`` as text): each was a TypeError traceback
        "pipelines:\n  mine:\n    train: {lr: 1e-3}\n": r"pipelines.mine.train.lr: '1e-3' is not a number "
                                                        r"\(YAML reads a number without a dot.*1.0e-3",
        "pipelines:\n  mine:\n    train: {epochs: ten}\n": r"pipelines.mine.train.epochs: 'ten' is not a whole",
        "pipelines:\n  mine:\n    train: {batch_size: 16.5}\n": r"train.batch_size: 16.5 is not a whole number",
        "pipelines:\n  mine:\n    extract: {token_ratio: 20%}\n": r"extract.token_ratio: '20%' is not a number",
        "pipelines:\n  mine:\n    extract: {layers: 3}\n": r"extract.layers: 3 is not a list of whole numbers",
        "pipelines:\n  mine:\n    mean: 0.5\n": r"pipelines.mine.mean: 0.5 is not a list of numbers",
        "pipelines:\n  mine:\n    classes: benign\n": r"pipelines.mine.classes: 'benign' is not a list of strings",
        "pipelines:\n  mine:\n    classes: [0, 1]\n": r"classes: \[0, 1\] is not a list of strings",
        "pipelines:\n  mine:\n    source: imagefolder\n": r"source 'imagefolder': choose one of folder, cmmd",
        "pipelines:\n  mine:\n    source: synthetic\n    counts: {train: 8}\n": r"counts .*each split, train, val",
        "defaults:\n  sweep: {seeds: three}\n": r"defaults.sweep.seeds: 'three' is not a whole number",
        "pipelines:\n\tmine: {}\n": r"not readable YAML \(.*, line 2\)",
        "pipelines:\n  mine:\n    train: {lr: 0.1}\n    train: {epochs: 3}\n": r"'train' is given twice, line 4",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = write_pipelines(tmp_path / f"p{i}.yaml", text)
        with pytest.raises(FptError, match=message):
            train_config("x.zarr", "mine", path)
        monkeypatch.setenv("FPT_PIPELINES", str(path))             # the environment variable, checked the same way
        with pytest.raises(FptError, match=str(path)):
            extract_config("demo")
        monkeypatch.delenv("FPT_PIPELINES")
    with pytest.raises(FptError, match="no such file"):
        extract_config("demo", pipelines=tmp_path / "missing.yaml")


def test_user_pipelines_merge_over_the_packaged_ones(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    env_file = write_pipelines(tmp_path / "env.yaml", f"""
pipelines:
  mine:
    classes: [a, b]
    data: {data}
    mean: [0.1, 0.2, 0.3]
    std: [0.3, 0.2, 0.1]
    train: {{lr: 0.002, augment: strong}}
  cmmd:
    train: {{lr: 0.003}}
""")
    option_file = write_pipelines(tmp_path / "option.yaml", "pipelines:\n  mine:\n    train: {epochs: 7}\n")
    monkeypatch.setenv("FPT_PIPELINES", str(env_file))
    mine = extract_config("mine")
    assert mine.classes == ["a", "b"] and mine.data == data and mine.mean == (0.1, 0.2, 0.3)
    assert mine.backbone == pipeline_entry(None)["extract"]["backbone"]       # the packaged defaults still apply
    cfg = train_config("x.zarr", "mine", option_file)                          # --pipelines over $FPT_PIPELINES
    assert (cfg.lr, cfg.epochs, cfg.augment.vflip) == (0.002, 7, 0.5)
    cmmd = train_config("x.zarr", "cmmd")
    assert cmmd.lr == 0.003 and cmmd.weight_decay == 0.1                       # only the key it names changes
    assert sweep_config("x.zarr", "mine", pipelines=option_file).train.epochs == 7
    monkeypatch.delenv("FPT_PIPELINES")
    with pytest.raises(FptError, match="unknown dataset 'mine'"):
        extract_config("mine")


def test_a_key_both_user_files_set_is_the_pipelines_options_and_an_entry_keeps_what_it_does_not_name(
        tmp_path, monkeypatch):
    """One order for a key set in several places: the packaged file, then $FPT_PIPELINES, then --pipelines FILE,
    then the command's options. A user entry that names only cmmd's lr and epochs changes those two keys: cmmd
    keeps its source, classes, statistics and its other training values from the packaged file."""
    from fpt.config import load_pipelines, packaged_pipelines

    env_file = write_pipelines(tmp_path / "env.yaml", "pipelines:\n  cmmd:\n    train: {lr: 0.003, epochs: 4}\n")
    option_file = write_pipelines(tmp_path / "option.yaml", "pipelines:\n  cmmd:\n    train: {lr: 0.007}\n")
    monkeypatch.setenv("FPT_PIPELINES", str(env_file))
    assert train_config("x.zarr", "cmmd").lr == 0.003                                  # $FPT_PIPELINES alone
    cfg = train_config("x.zarr", "cmmd", option_file)
    assert (cfg.lr, cfg.epochs) == (0.007, 4)                                          # --pipelines over it
    assert train_config("x.zarr", "cmmd", option_file, lr=0.009).lr == 0.009          # the option over both
    packaged, merged = (pipeline_entry("cmmd", table) for table in (packaged_pipelines(), load_pipelines(option_file)))
    assert {k: v for k, v in merged.items() if k != "train"} == {k: v for k, v in packaged.items() if k != "train"}
    assert merged["train"] == {**packaged["train"], "lr": 0.007, "epochs": 4}
    assert packaged["source"] == "cmmd" and packaged["train"]["lr"] != 0.007


def test_user_pipelines_values_are_validated_like_options(tmp_path):
    path = write_pipelines(tmp_path / "p.yaml", "pipelines:\n  mine:\n    train: {method: fpt, prompts: 0}\n")
    with pytest.raises(FptError, match="--method fpt needs --prompts > 0"):
        train_config("x.zarr", "mine", path)
    path = write_pipelines(tmp_path / "q.yaml", "pipelines:\n  mine:\n    train: {augment: {hflip: 2}}\n")
    with pytest.raises(FptError, match="augment hflip 2"):
        train_config("x.zarr", "mine", path)


def test_pipelines_values_of_the_wrong_type_are_refused_before_any_work(tmp_path):
    """A two-value mean has the right type (a list) but not three numbers: it was refused only once the store was
    half made."""
    data = tmp_path / "data"
    data.mkdir()
    for i, mean in enumerate(("[0.5, 0.5]", "'0.5,0.5,0.5'")):                # the right type, not three numbers
        path = write_pipelines(tmp_path / f"m{i}.yaml", f"pipelines:\n  mine:\n    mean: {mean}\n")
        with pytest.raises(FptError, match="--mean .*give three numbers, R,G,B"):
            extract_config("mine", data, path)
    assert extract_config("demo").mean == (0.5, 0.5, 0.5)                      # the packaged file still reads


def test_a_sweep_grid_whose_values_name_one_run_folder_or_whose_seeds_overflow_is_refused():
    """Run folders are named by lr and weight decay to 6 significant digits: two values equal there shared one
    folder (the second was never trained, and the same command then refused to resume). Seeds past 2^32 - 1 were
    refused only after the whole grid had trained."""
    with pytest.raises(FptError, match=r"round to the same 6 significant digits \(0.001\)"):
        sweep_config("x.zarr", None, lr="0.001,0.0010000001")
    with pytest.raises(FptError, match="round to the same 6 significant digits"):
        sweep_config("x.zarr", None, weight_decay="0.1,0.10000001")
    with pytest.raises(FptError, match="--seed 4294967295 with --seeds 2: the repeats use seeds up to 4294967296"):
        sweep_config("x.zarr", None, seed=2**32 - 1, seeds=2)
    assert sweep_config("x.zarr", None, seed=2**32 - 2, seeds=2).seeds == 2


def test_cli_takes_a_pipelines_file(tmp_path):
    from typer.testing import CliRunner

    from fpt.cli import app

    path = write_pipelines(tmp_path / "p.yaml", "pipelines:\n  demo:\n    extract: {token_ratoi: 0.1}\n")
    result = CliRunner().invoke(app, ["extract", "--dataset", "demo", "--pipelines", str(path)])
    assert result.exit_code == 2 and "unknown key 'token_ratoi'" in result.output
    assert "Traceback" not in result.output


def test_saved_configs_rebuild_with_their_augmentation():
    """A run's config goes through JSON (last.pt, metrics.json, sweep tasks) and comes back the same."""
    import json
    from dataclasses import asdict

    from fpt.config import TrainConfig

    cfg = train_config(Path("x.zarr"), None, augment="strong,hflip=0.25", drop_last=False, out=Path("runs/x"))
    again = TrainConfig(**json.loads(json.dumps(asdict(cfg), default=str)))
    assert again == cfg and again.augment.hflip == 0.25 and again.drop_last is False
    assert isinstance(again.out, Path) and again.store == "x.zarr"
    assert train_config("x.zarr", None, out="").out is None                # empty: the default run folder


def test_helper_processes_lower_their_priority_on_cuda_only_unless_the_environment_says(monkeypatch):
    """``helper_niceness``: HELPER_NICENESS on CUDA, 0 on a CPU; FPT_HELPER_NICENESS (0-19) overrides both, and
    anything else in it is one clear error."""
    import torch

    from fpt.config import HELPER_NICENESS, HELPER_NICENESS_ENV, helper_niceness

    cuda, cpu = torch.device("cuda"), torch.device("cpu")           # a device object: no GPU needed
    monkeypatch.delenv(HELPER_NICENESS_ENV, raising=False)
    assert HELPER_NICENESS > 0
    assert (helper_niceness(cuda), helper_niceness(cpu)) == (HELPER_NICENESS, 0)
    for text, want in (("0", 0), ("7", 7), ("19", 19)):
        monkeypatch.setenv(HELPER_NICENESS_ENV, text)
        assert helper_niceness(cuda) == helper_niceness(cpu) == want
    for bad in ("-1", "20", "high", ""):
        monkeypatch.setenv(HELPER_NICENESS_ENV, bad)
        with pytest.raises(FptError, match=HELPER_NICENESS_ENV):
            helper_niceness(cuda)


def test_prompts_given_with_a_method_without_prompts_are_refused_on_the_command_line(micro_store):
    """fpt train and fpt sweep refuse both given; a program may pass a prompt count for every method."""
    from tests.helpers import fails_cleanly

    for command, method in (("train", "side-only"), ("sweep", "linear-probe")):
        fails_cleanly([command, "--store", str(micro_store), "--method", method, "--prompts", "8"],
                      f"--method {method} has no prompts: drop --prompts 8")
    assert train_config(micro_store, None, method="side-only", prompts=3).prompts == 0


def test_resume_keeps_only_options_that_do_not_change_the_results():
    """--resume RUN: every TrainConfig field outside RUNTIME_FIELDS (and --out: RUN is the folder) is refused by
    its flag; the runtime options given pass through, those not given stay out."""
    for name in (f.name for f in fields(TrainConfig)):
        value = False if name == "drop_last" else 1
        flag = "--drop-last/--keep-last" if name == "drop_last" else "--" + name.replace("_", "-")
        if name in RUNTIME_FIELDS and name != "out":
            assert resume_options("run", {name: value, "seed": None}) == {name: value}
        else:
            with pytest.raises(FptError, match=f"drop {flag} \\(a run with other settings"):
                resume_options("run", {name: value, "device": "cpu"})


def test_resume_takes_every_runtime_option_and_a_run_compares_without_them():
    """The runtime options (where and how a run computes, not what) are the ones ``fpt train --resume`` takes and
    the ones a resumed run's saved config is compared without: device, cache, cache budget, reader workers, the PME
    reference memory, corrupt ids already found, compile, CUDA graph and checkpoint interval."""
    from dataclasses import replace

    from fpt.train.loop import comparable_config

    runtime = dict(device="cpu", cache="ram", cache_budget_mb=100.0, workers=2, ft_memory_mb=2000.0, corrupt=["s1"],
                   compile=False, cuda_graph=False, checkpoint_seconds=5.0)
    assert resume_options("run", {**runtime, "lr": None, "seed": None}) == runtime
    base = train_config("x.zarr", None)
    assert comparable_config(replace(base, **runtime)) == comparable_config(base)
    assert comparable_config(replace(base, lr=0.5)) != comparable_config(base)


def test_token_ratio_is_a_share_of_the_tokens_up_to_all_of_them():
    """--token-ratio in (0, 1]: 1 keeps every token (the LPM's full K/V), 0 or more than 1 is refused."""
    assert extract_config("demo", token_ratio=1.0).token_ratio == 1.0
    assert extract_config("demo", token_ratio=0.01).token_ratio == 0.01
    for bad in (0.0, 1.01, -0.2):
        with pytest.raises(FptError, match=f"--token-ratio {bad}: must be in \\(0, 1\\]"):
            extract_config("demo", token_ratio=bad)


def test_default_output_names_come_from_the_stores_name_however_it_is_written():
    """A store named with a trailing slash (as shells complete a folder) gives the default sweep folder, run
    folder and picture names of the store named without it, locally or as a URL."""
    from fpt.store import store_stem

    for plain in ("runs/cmmd.zarr", "s3://bucket/stores/cmmd.zarr"):
        assert store_stem(plain + "/") == store_stem(plain) == store_stem(Path(plain).name)
        assert sweep_config(plain + "/").out == sweep_config(plain).out


def test_auto_precision_is_fp16_on_cuda_and_fp32_on_a_cpu():
    """``--precision auto``: fp16 on CUDA (its 3 more mantissa bits than bf16 keep the selection closer to the fp32
    reference, at the same speed), fp32 on a CPU; a precision given is kept on either device."""
    import torch

    from fpt.config import PRECISIONS, resolve_precision

    cuda, cpu = torch.device("cuda"), torch.device("cpu")           # a device object: no GPU needed
    assert resolve_precision("auto", cuda) == "fp16" and resolve_precision("auto", cpu) == "fp32"
    for given in (p for p in PRECISIONS if p != "auto"):
        assert resolve_precision(given, cuda) == resolve_precision(given, cpu) == given


def test_device_is_checked_for_every_command(micro_store):
    """--device has one rule (auto, cpu, cuda, cuda:N) for extract, train, sweep and for evaluate/predict, which
    take it without a config: a name torch does not know, or one it knows but fpt cannot run on, is one line."""
    from fpt.config import resolve_device

    for bad in ("foo", "meta", "mps", "cuda:x"):
        with pytest.raises(FptError, match=f"--device '{bad}': choose auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
        with pytest.raises(FptError, match=f"--device '{bad}'"):
            train_config(micro_store, None, device=bad)
    assert str(resolve_device("cpu")) == "cpu"
