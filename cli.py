"""The ``fpt`` command: parse options, merge them over pipelines.yaml (fpt.config), call one function, show it."""
from __future__ import annotations

import functools
import json
import warnings
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich import box
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from fpt import FptError
from fpt import config as fpt_config

if TYPE_CHECKING:
    from fpt.train.results import RunMetrics

app = typer.Typer(
    help="FPT+ for high-resolution medical images: extract a frozen ViT's important-token K/V once into a Zarr "
         "store, then train small side networks from it as often as you like.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="markdown")
console = Console()
err = Console(stderr=True)


def friendly(fn):
    """Bad input -> one red line on stderr and exit code 2, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*RANDOMLY INITIALISED")
                return fn(*args, **kwargs)
        except FptError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted: finished work is kept; re-run the same command to resume[/]")
            raise typer.Exit(130) from None
    return wrapper


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, transient=False)


def run_extract(cfg: fpt_config.ExtractConfig, scheduler: str | None = None):
    from fpt.extract import extract

    if cfg.random_init:
        err.print(f"[bold yellow]WARNING: {cfg.backbone} is randomly initialised (--random-init): the store will "
                  "carry no pre-trained knowledge. This is recorded in the store.[/]")
    with _progress() as progress:
        task = progress.add_task(f"extract {cfg.name}", total=None, rate="")

        def update(done: int, total: int):
            speed = progress.tasks[task].speed
            progress.update(task, completed=done, total=total, rate=f"{speed:.3g} img/s" if speed else "")
        result = extract(cfg, progress=update, scheduler=scheduler,
                         warn=lambda message: err.print(f"[bold yellow]WARNING: {message}[/] (recorded in the store)",
                                                        highlight=False, soft_wrap=True))
    if result.n_written == 0:
        console.print(f"{result.path}: complete already ({result.n_samples} samples), nothing to do")
    else:
        console.print(f"wrote {result.n_written} samples to [bold]{result.path}[/] in {result.seconds:.1f} s "
                      f"({result.images_per_s:.3g} images/s, peak memory {result.peak_memory_mb:.0f} MB)")
    if result.n_skipped:
        err.print(f"[bold yellow]skipped {result.n_skipped} unreadable images[/] (excluded from every split); "
                  f"paths and errors: {result.skipped_report}")
    return result


PIPELINES_OPTION = typer.Option(None, help="Your own pipelines file, merged over the packaged pipelines.yaml "
                                "[default: $FPT_PIPELINES].")
AUGMENT_OPTION = typer.Option(None, help="Side-input augmentation: paper (default), strong or none, with overrides "
                              "such as paper,vflip=0.5,scale=0.6:1.")
DROP_LAST_OPTION = typer.Option(None, "--drop-last/--keep-last", help="Drop each epoch's last partial batch "
                                "[default: drop, as the paper].")


@app.command()
@friendly
def extract(
    dataset: Optional[str] = typer.Option(None, help="Pipeline name from pipelines.yaml (demo, cmmd, ddsm, ...)."),
    data: Optional[Path] = typer.Option(None, help="Raw data: an ImageFolder tree DATA/{train,val,test}/CLASS/IMAGE, "
                                        "a CSV manifest (path,label[,split][,group]) or, with --dataset cmmd, the CMMD folder."),
    res: Optional[int] = typer.Option(None, help="LPM input side in pixels (multiple of the patch size)."),
    out: Optional[str] = typer.Option(None, help="Store: a path or an fsspec URL such as s3://bucket/NAME.zarr "
                                      "[default: NAME.zarr]."),
    backbone: Optional[str] = typer.Option(None, help="timm ViT name, or in21k, dino, vit-l, fpt-code "
                                           "[default: vit_base_patch16_384.orig_in21k_ft_in1k = fpt-code]."),
    weights: Optional[Path] = typer.Option(None, help="Local weights: timm/torch state dict or .safetensors."),
    random_init: bool = typer.Option(False, "--random-init", help="Use a randomly initialised LPM (tests/demos only)."),
    layers: Optional[str] = typer.Option(None, help="LPM layers to extract: 6-11 or 6,8,10 [default: last half]."),
    token_ratio: Optional[float] = typer.Option(None, help="Share of tokens kept per layer and head, in (0, 1]."),
    importance: Optional[str] = typer.Option(None, help="global (mean attention received) or cls (class-token row)."),
    image_res: Optional[int] = typer.Option(None, help="Side of the stored low-res copy [default: 2x side res]."),
    batch_size: Optional[int] = typer.Option(None, help="Images per LPM forward pass."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda."),
    mean: Optional[str] = typer.Option(None, help="Normalisation mean, R,G,B in [0, 1], or auto (train split)."),
    std: Optional[str] = typer.Option(None, help="Normalisation std, R,G,B, or auto (train split)."),
    shard_size: Optional[int] = typer.Option(None, help="Samples per shard file [default: ~64 MB of raw data]."),
    workers: Optional[int] = typer.Option(None, help="Image-decoding processes [default: 0 on CPU, up to 8 on CUDA]."),
    write_threads: Optional[int] = typer.Option(None, help="Shards compressed and written at once, overlapping the "
                                                "LPM [default: 1 on CPU, 2-8 on CUDA]."),
    codec: Optional[str] = typer.Option(None, help="Chunk compression of a new store (lossless): zstd-1 (default, "
                                        "fast), zstd-5 (~5% smaller, ~5x slower to write) or lz4 (fastest, larger)."),
    scheduler: Optional[str] = typer.Option(None, help="Run shards as dask tasks: local:N or a scheduler address."),
    on_error: Optional[str] = typer.Option(None, help="Unreadable image: fail (default) or skip (listed in the "
                                                      "store's skipped.csv, excluded from every split)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store that holds a different extraction."),
    pipelines: Optional[Path] = PIPELINES_OPTION,
):
    """Run the frozen LPM once over a dataset and write its important tokens' K/V to a Zarr store."""
    cfg = fpt_config.extract_config(
        dataset, data, pipelines, res=res, out=out, backbone=backbone, weights=weights,
        random_init=random_init or None,
        layers=fpt_config.parse_layers(layers), token_ratio=token_ratio, importance=importance,
        image_res=image_res, batch_size=batch_size, device=device, samples_per_shard=shard_size,
        mean=fpt_config.parse_normalization(mean, "mean"), std=fpt_config.parse_normalization(std, "std"),
        workers=workers, write_threads=write_threads, codec=codec, on_error=on_error, overwrite=overwrite or None)
    run_extract(cfg, scheduler)


def _train_cfg(store: Optional[str], pipelines: Optional[Path] = None, **options) -> fpt_config.TrainConfig:
    from fpt.store import StoreReader

    if store is None:
        raise FptError("give --store PATH (or --resume RUN to continue an interrupted run)")
    dataset = StoreReader(store).attrs["dataset"]["name"]
    return fpt_config.train_config(store, dataset, pipelines, **options)


def run_train(cfg: fpt_config.TrainConfig) -> RunMetrics:
    from fpt.train import train

    with _progress() as progress:
        task = progress.add_task("train", total=cfg.epochs, rate="")

        def start(info: dict):
            resumed = info["resumed_from_epoch"]
            console.print(f"{info['method']} on {info['device']}: {info['train']} train / {info['val']} val samples; "
                          f"cache {info['cache']['reason']}"
                          + (f"; resuming after epoch {resumed}" if resumed is not None else ""), highlight=False)
            if resumed is not None:
                progress.update(task, completed=resumed + 1)

        def update(record: dict):
            auc = record["val"]["auc"]
            progress.update(task, advance=1, rate=f"loss {record['loss']:.3f} val AUC "
                            f"{auc:.4f}" if auc is not None else f"loss {record['loss']:.3f}")
        return train(cfg, on_epoch=update, on_start=start)


@app.command("train")
@friendly
def train_cmd(
    store: Optional[str] = typer.Option(None, help="Store (path or URL) written by `fpt extract` "
                                        "(required unless --resume)."),
    out: Optional[Path] = typer.Option(None, help="Run directory [default: runs/STORE-TIMESTAMP]."),
    side_res: Optional[int] = typer.Option(None, help="Side network input side (multiple of the patch size)."),
    prompts: Optional[int] = typer.Option(None, help="Fine-grained prompts per layer; 0 = side network alone."),
    reduction: Optional[int] = typer.Option(None, help="Side width = LPM width / reduction."),
    epochs: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None, help="AdamW learning rate [default: the dataset's pipeline entry]."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay on all parameters [default: 0.1]."),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda."),
    method: Optional[str] = typer.Option(None, help="fpt+ (default), fpt, side-only or linear-probe."),
    cache: Optional[str] = typer.Option(None, help="auto, none, ram or gpu: where train+val live while training."),
    cache_budget_mb: Optional[float] = typer.Option(None, help="auto cache budget [default: half the free memory]."),
    workers: Optional[int] = typer.Option(None, help="Store-reading processes when streaming [default: per device]."),
    ft_memory_mb: Optional[float] = typer.Option(None, help="Full fine-tuning memory (MB) for PME."),
    skip_corrupt: bool = typer.Option(False, "--skip-corrupt", help="Train without samples that fail their "
                                      "checksums (default: refuse, naming them)."),
    resume: Optional[Path] = typer.Option(None, help="Continue the interrupted run in this directory."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the training step "
                                           "(CUDA graphs on CUDA) [default: on for CUDA, off for CPU]."),
    augment: Optional[str] = AUGMENT_OPTION,
    drop_last: Optional[bool] = DROP_LAST_OPTION,
    pipelines: Optional[Path] = PIPELINES_OPTION,
):
    """Train the side network with fine-grained prompts (or a baseline) from a store; best checkpoint by val AUC,
    then test. An interrupted run continues with --resume RUN (or the same command with the same --out)."""
    if resume is not None:
        from fpt.train.loop import resume_config

        cfg = resume_config(resume, device=device, cache=cache, cache_budget_mb=cache_budget_mb, workers=workers,
                            compile=compile)
    else:
        cfg = _train_cfg(store, pipelines, out=out, side_res=side_res, prompts=prompts, reduction=reduction,
                         epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                         device=device, method=method, cache=cache, cache_budget_mb=cache_budget_mb, workers=workers,
                         ft_memory_mb=ft_memory_mb, skip_corrupt=skip_corrupt or None, compile=compile,
                         augment=augment, drop_last=drop_last)
    m = run_train(cfg)
    show_metrics([m])


def show_metrics(runs: list[RunMetrics]) -> None:
    """Test metrics of finished runs, one row each, narrow enough for an 80-column terminal."""
    with_pme = any(m.efficiency.get("pme") is not None for m in runs)
    table = Table(title="test metrics (best val-AUC checkpoint)", box=box.SIMPLE_HEAD, pad_edge=False,
                  padding=(0, 0))
    for col in ("method", "AUC", "acc", "F1", "kappa", "learn. %", "PPE", *(["PME"] if with_pme else []),
                "samples/s", "peak MB"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for m in runs:
        t, p, e, tp = m.test, m.params, m.efficiency, m.throughput
        table.add_row(m.method, fmt(t["auc"]), fmt(t["acc"]), fmt(t["f1"]), fmt(t["kappa"]),
                      f"{p['ratio_percent']:.2f}", fmt(e.get("ppe")), *([fmt(e.get("pme"))] if with_pme else []),
                      f"{tp.train_samples_per_s:.0f}", f"{tp.peak_memory_mb:.0f}")
    console.print(table)
    for m in runs:
        console.print(f"{m.method} run: {m.run_dir} (best epoch {m.best_epoch}: {m.best_reason})", highlight=False)


@app.command()
@friendly
def evaluate(
    store: str = typer.Option(..., help="Store (path or URL) to evaluate on."),
    checkpoint: Path = typer.Option(..., help="best.pt from a run on this store."),
    split: str = typer.Option("test", help="train, val or test."),
    device: str = typer.Option("auto"),
):
    """Evaluate a trained checkpoint on one split of a store."""
    from fpt.train import evaluate_checkpoint

    result = evaluate_checkpoint(store, checkpoint, split, device=device)
    table = Table(title=f"{checkpoint} on {store} ({split}, n={result.n})")
    for k in ("auc", "acc", "f1", "kappa", "precision", "recall"):
        table.add_column(k, justify="right")
    table.add_row(*("-" if result.metrics[k] is None else f"{result.metrics[k]:.4f}" for k in
                    ("auc", "acc", "f1", "kappa", "precision", "recall")))
    console.print(table)


@app.command()
@friendly
def sweep(
    store: str = typer.Option(..., help="Store (path or URL) written by `fpt extract` (read-only for every run)."),
    lr: Optional[str] = typer.Option(None, help="Learning rates to grid-search, e.g. 1e-4,5e-4,1e-3 "
                                     "[default: the dataset's published lr x 0.5, 1, 2]."),
    weight_decay: Optional[str] = typer.Option(None, help="Weight decays to grid-search [default: 0.05,0.1]."),
    seeds: Optional[int] = typer.Option(None, help="Repeats of the best configuration (seed, seed+1, ...)."),
    scheduler: Optional[str] = typer.Option(None, help="local (N from GPU/CPU count), local:N or a dask address."),
    out: Optional[Path] = typer.Option(None, help="Sweep directory [default: sweeps/STORE-METHOD]."),
    method: Optional[str] = typer.Option(None, help="fpt+ (default), fpt, side-only or linear-probe."),
    side_res: Optional[int] = typer.Option(None),
    prompts: Optional[int] = typer.Option(None),
    reduction: Optional[int] = typer.Option(None),
    epochs: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    seed: Optional[int] = typer.Option(None, help="Base seed (the grid runs use it)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda (one GPU per task)."),
    cache: Optional[str] = typer.Option(None, help="auto, none, ram or gpu (per run)."),
    ft_memory_mb: Optional[float] = typer.Option(None, help="Full fine-tuning memory (MB) for PME."),
    skip_corrupt: bool = typer.Option(False, "--skip-corrupt", help="Leave out samples that fail their checksums."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile each run's training "
                                           "step [default: on for CUDA, off for CPU]."),
    runs_per_gpu: Optional[int] = typer.Option(None, help="Runs trained at once on each GPU of a local scheduler "
                                               "[default: from free GPU memory and the step's measured peak]."),
    augment: Optional[str] = AUGMENT_OPTION,
    drop_last: Optional[bool] = DROP_LAST_OPTION,
    pipelines: Optional[Path] = PIPELINES_OPTION,
):
    """The paper's protocol: grid-search lr x weight decay on val AUC, repeat the best over seeds, report test
    mean ± std. Runs are dask tasks; re-running the same command resumes, skipping finished runs."""
    from fpt.store import StoreReader
    from fpt.train.sweep import run_sweep

    dataset = StoreReader(store).attrs["dataset"]["name"]
    cfg = fpt_config.sweep_config(store, dataset, lr=lr, weight_decay=weight_decay, seeds=seeds, scheduler=scheduler,
                                  out=out, pipelines=pipelines, method=method, side_res=side_res, prompts=prompts,
                                  reduction=reduction, epochs=epochs, batch_size=batch_size, seed=seed, device=device, cache=cache,
                                  ft_memory_mb=ft_memory_mb, skip_corrupt=skip_corrupt or None, compile=compile,
                                  runs_per_gpu=runs_per_gpu, augment=augment, drop_last=drop_last)
    with _progress() as progress:
        task = progress.add_task("sweep", total=None, rate="")

        def stage(name: str, n: int):
            progress.update(task, description=f"sweep: {name}", total=(progress.tasks[task].total or 0) + n)

        def done(run, metrics, skipped: bool):
            progress.update(task, advance=1, rate=f"{run.name} {'(finished before)' if skipped else ''}")
        summary = run_sweep(cfg, on_run=done, on_stage=stage)
    show_sweep(summary)


def show_sweep(s: dict) -> None:
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    grid = Table(title=f"grid ({s['method']}, selection by val AUC)")
    for col in ("lr", "weight decay", "val AUC", ""):
        grid.add_column(col, justify="right")
    for g in s["grid"]:
        best = (g["lr"], g["weight_decay"]) == (s["best"]["lr"], s["best"]["weight_decay"])
        grid.add_row(f"{g['lr']:g}", f"{g['weight_decay']:g}", fmt(g["val_score"]), "best" if best else "")
    console.print(grid)
    table = Table(title=f"test over {len(s['seeds'])} seeds: lr {s['best']['lr']:g}, "
                        f"weight decay {s['best']['weight_decay']:g} (mean ± std)")
    for col in ("metric", "mean ± std", *(f"seed {r['seed']}" for r in s["seeds"])):
        table.add_column(col, justify="left" if col == "metric" else "right", no_wrap=True)
    for k, stat in s["test"].items():
        mean_std = "-" if stat["mean"] is None else f"{stat['mean']:.4f} ± {stat['std']:.4f}"
        table.add_row(k, mean_std, *(fmt(r["test"][k]) for r in s["seeds"]))
    e, p = s["efficiency"], s["params"]
    table.add_row("PPE / PME", f"{fmt(e['ppe'])} / {fmt(e['pme'])}")
    table.add_row("learnable", f"{p['learnable']:,} ({p['ratio_percent']:.2f} %)")
    console.print(table)
    console.print(f"{s['ran']} runs trained, {s['skipped']} finished before; "
                  f"results: {Path(s['config']['out']) / 'sweep.json'}, sweep.csv", highlight=False)


@app.command()
@friendly
def predict(
    images: list[Path] = typer.Argument(..., help="Image files, folders (recursive) or CSV files with a path column."),
    checkpoint: Path = typer.Option(..., help="best.pt of a training run."),
    weights: Optional[Path] = typer.Option(None, help="The LPM weights the store was extracted with."),
    random_init: bool = typer.Option(False, "--random-init", help="The store's LPM was random-init (seeded)."),
    out: Optional[Path] = typer.Option(None, help="Also write the probabilities to a .csv or .json file."),
    batch_size: int = typer.Option(8, help="Images per LPM forward pass."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
):
    """Class probabilities per image: the LPM at the store's resolution and selection, then the trained model."""
    from fpt.predict import check_output, predict_images, write_predictions

    if out is not None:
        check_output(out)
    result = predict_images(checkpoint, images, weights, random_init, device, batch_size)
    table = Table(title=f"{result['method']} predictions ({checkpoint})")
    for col in ("image", "prediction", *result["classes"]):
        table.add_column(col, justify="left" if col in ("image", "prediction") else "right")
    for row in result["rows"]:
        table.add_row(row["image"], row["prediction"], *(f"{row['probabilities'][c]:.4f}" for c in result["classes"]))
    console.print(table)
    if out is not None:
        write_predictions(result, out)
        console.print(f"wrote {out}")


@app.command()
@friendly
def show(
    store: str = typer.Option(..., help="Store (path or URL) written by `fpt extract`."),
    sample: str = typer.Option(..., help="Sample id (e.g. test/malignant/003.png) or row number."),
    checkpoint: Optional[Path] = typer.Option(None, help="best.pt of an fpt+/fpt run: adds the prompts' attention."),
    layer: Optional[str] = typer.Option(None, help="LPM layer(s): 11, 6,11 or all [default: the top one]."),
    head: Optional[str] = typer.Option(None, help="Head(s): 0, 0,3 or all [default: all]."),
    tile: int = typer.Option(192, help="Pixels per image tile."),
    out: Optional[Path] = typer.Option(None, help="PNG path [default: STORE-ROW.png]."),
):
    """Draw one sample's selected tokens per layer/head and the prompts' attention over them (paper Fig. 9)."""
    from fpt.train.show import show as draw

    console.print(f"wrote {draw(store, sample, out, checkpoint, layer, head, tile)}")


def _integrity_line(report) -> str:
    if report.ok:
        return "ok: every chunk read and checksummed" if report.full else \
            "files present (pass --verify to checksum every chunk)"
    return f"[bold red]{len(report.bad_samples)} samples affected[/] (see below)"


def show_problems(report, attrs) -> None:
    from fpt.store import StoreReader

    try:
        ids = StoreReader(report.path).ids
    except Exception:
        ids = None
    table = Table(title=f"[red]problems in {report.path}")
    for col in ("array", "problem", "samples", "first affected"):
        table.add_column(col)
    for p in report.problems:
        first = [str(ids[i]) if ids is not None else str(i) for i in p.samples[:3]]
        table.add_row(p.array, p.reason, str(len(p.samples)), ", ".join(first) + (" …" if len(p.samples) > 3 else ""))
    console.print(table)


store_app = typer.Typer(help="Store maintenance.", no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("verify")
@friendly
def store_verify(path: str = typer.Argument(..., help="Store path or URL."),
                 repair: bool = typer.Option(False, "--repair", help="Mark the shards of missing or corrupt samples "
                                             "as not done; the same `fpt extract` command then rewrites them.")):
    """Read every chunk of a store and check its crc32c checksum; exit 1 when any sample is unfinished, missing
    or corrupt."""
    from fpt.store import StoreReader, mark_for_reextraction
    from fpt.store import verify as verify_store

    with _progress() as progress:
        task = progress.add_task("verify", total=None, rate="")
        report = verify_store(path, progress=lambda done, total: progress.update(task, completed=done, total=total))
    if report.ok:
        console.print(report.summary())
        return
    show_problems(report, StoreReader(path).attrs)
    if repair and len(report.damaged):
        shards = mark_for_reextraction(path)
        err.print(f"[bold yellow]marked {len(shards)} shard(s) for re-extraction[/]: re-run the same `fpt extract` "
                  "command to rewrite them", highlight=False, soft_wrap=True)
    else:
        err.print(f"[bold red]{report.summary()}[/]", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


@app.command()
@friendly
def inspect(path: str = typer.Argument(..., help="Store path or URL."),
            as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
            verify: Optional[bool] = typer.Option(None, "--verify/--quick", help="Read and checksum every chunk "
                                                  "[default: --verify for stores under 2 GB on disk].")):
    """Summarise a store (computed lazily with dask): backbone, extraction, counts, arrays, bytes, completeness,
    and which samples (if any) are missing or corrupt."""
    from fpt.store import summarize
    from fpt.store import verify as verify_store

    s = summarize(path)
    report = verify_store(path, full=verify if verify is not None else s["disk_bytes"] < 2 << 30)
    if as_json:
        s["integrity"] = {"full": report.full, "bad_samples": report.bad_samples.tolist(),
                          "problems": [p.__dict__ for p in report.problems]}
        console.print_json(json.dumps(s, default=str))
        return
    a = s["attrs"]
    bb, ex = a["backbone"], a["extraction"]
    head = Table.grid(padding=(0, 2))
    for k, v in [("store", s["path"]), ("schema version", a["fpt_store_version"]), ("fpt", a["fpt_version"]),
                 ("created", a["created"]),
                 ("backbone", f"{bb['name']} ({bb['weights_source']}, {bb['n_params']:,} params, "
                              f"D={bb['embed_dim']}, H={bb['heads']}, d={bb['head_dim']}, patch {bb['patch_size']})"),
                 ("weights sha256", bb["weights_sha256"][:16] + "…"),
                 ("extraction", f"res {ex['res']}, layers {ex['layers']}, token ratio {ex['token_ratio']} "
                                f"-> k={ex['k']}, importance {ex['importance']}, low-res {ex['image_res']} px"),
                 ("complete", f"{s['done']}/{s['n_samples']} samples"
                              + ("" if s["done"] == s["n_samples"] else "  [yellow](re-run extract to finish)[/]")),
                 ("integrity", _integrity_line(report)),
                 ("size", f"{_bytes(s['disk_bytes'])} on disk, {_bytes(s['raw_bytes'])} raw "
                          f"({s['disk_bytes'] / max(1, s['raw_bytes']):.2f}x), "
                          f"{_bytes(s['disk_bytes'] / max(1, s['n_samples']))} per sample")]:
        head.add_row(f"[bold]{k}", str(v))
    if bb["random_init"]:
        head.add_row("[bold red]warning", "[red]random-init LPM: no pre-trained knowledge")
    console.print(head)
    if not report.ok:
        show_problems(report, s["attrs"])
    if s["counts"] is None:
        return
    counts = Table(title="samples per split and class")
    classes = a["dataset"]["classes"]
    counts.add_column("split")
    for c in classes:
        counts.add_column(c, justify="right")
    counts.add_column("total", justify="right")
    for split, row in s["counts"].items():
        counts.add_row(split, *(str(row[c]) for c in classes), str(sum(row.values())))
    console.print(counts)
    arrays = Table(title="arrays")
    for col in ("name", "shape", "dtype", "chunk", "shard", "codecs", "raw", "disk"):
        arrays.add_column(col, no_wrap=col not in ("codecs",))
    for r in sorted(s["arrays"], key=lambda r: r["name"]):
        dims = lambda t: "×".join(map(str, t))  # noqa: E731
        arrays.add_row(r["name"], dims(r["shape"]), r["dtype"].replace("StringDType()", "string"), dims(r["chunks"]),
                       dims(r["shards"]) if r["shards"] else "-", "+".join(r["codecs"]),
                       _bytes(r["raw_bytes"]) if r["raw_bytes"] else "-", _bytes(r["disk_bytes"]))
    console.print(arrays)


@app.command()
@friendly
def demo(out_dir: Path = typer.Option(Path("fpt-demo"), help="Where the demo store and runs go."),
         epochs: Optional[int] = typer.Option(None, help="Training epochs [default: pipelines.yaml demo entry]."),
         device: Optional[str] = typer.Option(None, help="auto, cpu or cuda.")):
    """Generate the synthetic fine-texture task, extract it with a small random ViT, train FPT+ and the side
    network alone, and compare their test AUC."""
    store = str(out_dir / "demo.zarr")
    run_extract(fpt_config.extract_config("demo", out=store, device=device))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    runs = []
    for name, prompts in (("fpt+", None), ("side-only", 0)):
        console.rule(f"train {name}")
        cfg = _train_cfg(store, out=out_dir / "runs" / f"{name}-{stamp}", prompts=prompts, epochs=epochs,
                         device=device)
        runs.append(run_train(cfg))
    show_metrics(runs)
    console.print(f"store: [bold]{store}[/]  (try `fpt inspect {store}`)")


if __name__ == "__main__":
    app()
