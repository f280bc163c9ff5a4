"""The ``fpt`` command: parse options, merge them over pipelines.yaml (fpt.config), call one function, show it."""
from __future__ import annotations

import functools
import json
import logging
import warnings
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from fpt import FptError, __version__
from fpt import config as fpt_config

if TYPE_CHECKING:
    from fpt.train.results import RunMetrics, SweepSummary


def _no_flag_types(params: list) -> list:
    """Flags take no value: no ``<bool>`` type column for them in --help."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class Command(TyperCommand):
    def get_params(self, ctx):
        return _no_flag_types(super().get_params(ctx))


class Group(TyperGroup):
    def get_params(self, ctx):
        return _no_flag_types(super().get_params(ctx))


app = typer.Typer(
    help="FPT+ for high-resolution medical images: extract a frozen ViT's important-token K/V once into a Zarr "
         "store, then train small side networks from it as often as you like.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="markdown",
    cls=Group)
# emoji codes off: user text (paths, ids, class names) such as "cuda:x:" prints as written; markup in it is escaped
console = Console(emoji=False)
err = Console(stderr=True, emoji=False)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        def installed(name: str) -> str:
            try:
                return version(name)
            except PackageNotFoundError:
                return "not installed"
        console.print(f"fpt {__version__} (torch {installed('torch')}, timm {installed('timm')}, "
                      f"zarr {installed('zarr')})", highlight=False)
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Show the versions of fpt, torch, timm and zarr, and exit.")
                            ] = False):
    """FPT+ for high-resolution medical images: extract a frozen ViT's important-token K/V once into a Zarr store,
    then train small side networks from it as often as you like."""


# ---- options, declared once ([default: ...] from the packaged pipelines.yaml defaults) -------------------------
DATA, LPM, SELECTION, OUTPUT, HARDWARE = "Data", "LPM (the frozen ViT)", "Token selection", "Output", "Hardware"
SIDE, TRAINING = "Side network", "Training"
# zarr's chunk reads left pending when one fails (a corrupt store) are reported by asyncio, as the interpreter
# collects them, as "Task was destroyed but it is pending!": noise after the error the command has already said
logging.getLogger("asyncio").setLevel(logging.CRITICAL)

# the packaged defaults: a user's pipelines file ($FPT_PIPELINES) is read by the commands, whose errors are one line
DEFAULTS = fpt_config.pipeline_entry(None, fpt_config.packaged_pipelines())
EX, TR = DEFAULTS["extract"], DEFAULTS["train"]


def option(help: str, panel: str, default=None, metavar: str | None = None) -> typer.models.OptionInfo:
    """An option whose value, when not given, comes from the pipeline entry; ``default`` is shown in --help."""
    shown = "" if default is None else f" [default: {default}]"
    return typer.Option(help=help + shown, rich_help_panel=panel, metavar=metavar)


Dataset = Annotated[Optional[str], option("Pipeline name from pipelines.yaml (demo, cmmd, ddsm, ...): its classes, "
                                          "normalisation and training settings.", DATA)]
RawData = Annotated[Optional[Path], option(
    "Raw data: an ImageFolder tree DATA/{train,val,test}/CLASS/IMAGE, a CSV manifest (path,label[,split][,group]) "
    "or, with --dataset cmmd, the CMMD folder.", DATA)]
Mean = Annotated[Optional[str], option("Normalisation mean, R,G,B in [0, 1], or auto (the train split's).", DATA,
                                       default="the pipeline entry's")]
Std = Annotated[Optional[str], option("Normalisation std, R,G,B in (0, 1], or auto (the train split's).", DATA,
                                      default="the pipeline entry's")]
OnError = Annotated[Optional[str], option("Unreadable image: fail, or skip (listed in the store's skipped.csv, "
                                          "excluded from every split).", DATA, default="fail")]
J2kDecode = Annotated[Optional[str], option("JPEG 2000 DICOMs (mammograms): full, or reduced: decoded at the "
                                            "coarsest wavelet level that still covers --res (4-18x faster for a "
                                            "3328 x 2560 mammogram at 1024 / 512; the LPM input then differs "
                                            "slightly from a full decode's).", DATA, default="full")]
Res = Annotated[Optional[int], option("LPM input side in pixels (a multiple of the patch size).", LPM,
                                      default=EX["res"])]
Backbone = Annotated[Optional[str], option("timm ViT name or hf-hub:ORG/NAME (see the README's supported "
                                           "families), or in21k, dino, vit-l, fpt-code.", LPM, default=EX["backbone"])]
Weights = Annotated[Optional[Path], option("Local LPM weights: a timm/torch state dict or .safetensors file "
                                           "(without it, timm downloads the pretrained weights).", LPM)]
RandomInit = Annotated[bool, typer.Option("--random-init", help="A seeded random LPM (tests and demos only; "
                                          "recorded in the store).", rich_help_panel=LPM)]
Layers = Annotated[Optional[str], option("LPM layers to extract: 6-11 or 6,8,10.", LPM,
                                         default="the last half")]
TokenRatio = Annotated[Optional[float], option("Share of tokens kept per layer and head, in (0, 1].", SELECTION,
                                               default=EX["token_ratio"])]
Importance = Annotated[Optional[str], option("global (mean attention each token receives) or cls (the class "
                                             "token's attention; ViTs with a class token).", SELECTION,
                                             default=EX["importance"])]
ImageRes = Annotated[Optional[int], option("Side of the stored low-res copy the side network reads.", OUTPUT,
                                           default=EX["image_res"])]
StoreOut = Annotated[Optional[str], option("Store: a path or an fsspec URL such as s3://bucket/NAME.zarr.", OUTPUT,
                                           default="NAME.zarr")]
ShardSize = Annotated[Optional[int], option("Samples per shard file.", OUTPUT, default="~64 MB of raw data")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a store that holds a different extraction.",
                                         rich_help_panel=OUTPUT)]
ExtractBatch = Annotated[Optional[int], option("Images per LPM forward pass.", HARDWARE,
                                               default="CUDA 32, halved on out-of-memory; CPU 4")]
Device = Annotated[Optional[str], option("auto, cpu or cuda (auto: CUDA when present).", HARDWARE,
                                         default=EX["device"])]
DecodeWorkers = Annotated[Optional[int], option("Image-decoding processes.", HARDWARE,
                                                default="0 on CPU, one per core (up to 16) on CUDA")]
WriteThreads = Annotated[Optional[int], option("Shards compressed and written at once, overlapping the LPM.",
                                               HARDWARE, default="1 on CPU, one per core (2-16) on CUDA")]
Writers = Annotated[Optional[str], option("Who writes the shards: threads of this process, or writer processes "
                                          "(each with its own zarr event loop, so writing scales with the cores).",
                                          HARDWARE, default="processes on CUDA, threads on CPU")]
Precision = Annotated[Optional[str], option("The LPM's arithmetic: fp16, bf16 or fp32 (auto: fp16 on CUDA, where it "
                                            "keeps the selection closest to fp32 at bf16's speed; fp32 on a CPU). "
                                            "bf16 for backbones whose activations overflow fp16.", HARDWARE,
                                            default="auto")]
Codec = Annotated[Optional[str], option("Chunk compression of a new store (lossless): zstd-1 (fast and small), "
                                        "zstd-3 (~2% larger, ~3x slower to write), zstd-5 (~1% smaller, ~9x "
                                        "slower), lz4 (~5% larger) or none (checksummed, not compressed: half the "
                                        "writers' CPU or less, ~1.2x larger; for hosts whose CPUs limit "
                                        "extraction).", OUTPUT,
                                        default=fpt_config.DEFAULT_CODEC)]
DirectIo = Annotated[Optional[bool], typer.Option("--direct-io/--no-direct-io", help="Write shard files past the page "
                                                  "cache (O_DIRECT) where the filesystem allows it: the kernel's "
                                                  "page-cache work was most of a writer's CPU. --no-direct-io lets the "
                                                  "page cache absorb a run that a slow disk could not take "
                                                  "[default: direct].",
                                                  rich_help_panel=OUTPUT)]
Scheduler = Annotated[Optional[str], option("Run as dask tasks: local, local:N or a scheduler address.", HARDWARE)]

Store = Annotated[Optional[str], option("Store (path or URL) written by `fpt extract`.", DATA)]
SkipCorrupt = Annotated[bool, typer.Option("--skip-corrupt", help="Leave out samples that fail their checksums "
                                           "(otherwise: refuse, naming them).", rich_help_panel=DATA)]
Method = Annotated[Optional[str], option("fpt+, fpt (the earlier FPT fusion), side-only or linear-probe (on the "
                                         "stored cls feature).", SIDE, default=TR["method"])]
SideRes = Annotated[Optional[int], option("Side network input side in pixels (a multiple of the patch size, at "
                                          "most the store's --image-res).", SIDE, default=TR["side_res"])]
Prompts = Annotated[Optional[int], option("Fine-grained prompts per layer; 0 = the side network alone.", SIDE,
                                          default=TR["prompts"])]
Reduction = Annotated[Optional[int], option("Side network width = LPM width / reduction.", SIDE,
                                            default=TR["reduction"])]
Epochs = Annotated[Optional[int], option("Training epochs.", TRAINING, default=TR["epochs"])]
BatchSize = Annotated[Optional[int], option("Training samples per step.", TRAINING, default=TR["batch_size"])]
Seed = Annotated[Optional[int], option("Seed of initialisation, shuffling and augmentation.", TRAINING,
                                       default=TR["seed"])]
Cache = Annotated[Optional[str], option("auto, none, ram or gpu: where train+val live while training.", HARDWARE,
                                        default=TR["cache"])]
Compile = Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the training step: "
                                                 "faster steps for tens of seconds of compiling per run. "
                                                 "[default: off]", rich_help_panel=HARDWARE)]
CudaGraph = Annotated[Optional[bool], typer.Option("--cuda-graph/--no-cuda-graph", help="Capture the whole training "
                                                   "step (and the evaluation forward) as one CUDA graph. "
                                                   "[default: on for CUDA]", rich_help_panel=HARDWARE)]
CheckpointSeconds = Annotated[Optional[float], option(
    "Write last.pt (what --resume continues from) at most this often; 0 = after every epoch. Ctrl-C writes it "
    "too.", OUTPUT, default=f"{TR['checkpoint_seconds']:g}", metavar="SECONDS")]
FtMemory = Annotated[Optional[float], option("Full fine-tuning memory (MB, same device kind) to report PME.",
                                             OUTPUT, default="no PME")]


def friendly(fn):
    """Bad input -> one red line on stderr and exit code 2, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*RANDOMLY INITIALISED")
                return fn(*args, **kwargs)
        except FptError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted: finished work is kept; re-run the same command to resume[/]")
            raise typer.Exit(130) from None
        except OSError as e:        # the system refused: no permission, a file where a folder goes, a full disk
            err.print(f"[bold red]error:[/] {escape(os_error_line(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    return wrapper


def os_error_line(e: OSError) -> str:
    """``Permission denied: runs/x`` rather than ``[Errno 13] Permission denied: 'runs/x'``."""
    if e.strerror and e.filename is not None:
        return f"{e.strerror}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
    return f"{type(e).__name__}: {e}"


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, transient=False)


def run_extract(cfg: fpt_config.ExtractConfig, scheduler: str | None = None, pipelines: Path | None = None):
    from fpt.extract import extract

    if cfg.random_init:
        err.print(f"[bold yellow]WARNING: {escape(cfg.backbone)} is randomly initialised (--random-init): the store "
                  "will carry no pre-trained knowledge. This is recorded in the store.[/]")
    for warning in fpt_config.low_res_warnings(cfg, pipelines):
        err.print(f"[bold yellow]WARNING:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    weights = ("random init" if cfg.random_init else f"weights {cfg.weights.name}" if cfg.weights
               else "timm pretrained weights, downloaded unless cached")
    with _progress() as progress:
        task = progress.add_task(escape(f"{cfg.name}: listing images, loading {cfg.backbone} ({weights})"), total=None,
                                 rate="")

        def update(done: int, total: int):
            speed = progress.tasks[task].speed
            progress.update(task, description=f"extract {escape(cfg.name)}", completed=done, total=total,
                            rate=f"{speed:.3g} img/s" if speed else "")
        result = extract(cfg, progress=update, scheduler=scheduler,
                         warn=lambda message: err.print(f"[bold yellow]WARNING: {escape(message)}[/] (recorded in the "
                                                        "store)", highlight=False, soft_wrap=True))
    if result.n_written == 0:
        console.print(f"{escape(str(result.path))}: complete already ({result.n_samples} samples), nothing to do")
    else:
        steady = (f", {result.steady_images_per_s:.3g} after the first shard" if result.steady_images_per_s
                  else "")
        console.print(f"wrote {result.n_written} samples to [bold]{escape(str(result.path))}[/] in "
                      f"{result.seconds:.1f} s "
                      f"({result.images_per_s:.3g} images/s{steady}, peak memory {result.peak_memory_mb:.0f} MB)")
        if limit := result.limit():
            console.print(LIMIT_LINES[limit[0]].format(share=limit[1]), highlight=False)
    if result.n_skipped:
        err.print(f"[bold yellow]skipped {result.n_skipped} unreadable images[/] (excluded from every split); "
                  f"paths and errors: {result.skipped_report}")
    return result


LIMIT_LINES = {   # ExtractResult.limit() -> what the user reads
    "decoding": "decoding limited this run: the loop waited {share:.0%} of it for images (more --workers or cores "
                "help; for JPEG 2000 DICOMs also --j2k-decode reduced)",
    "writing": "writing limited this run: the loop waited {share:.0%} of it for the shard writers (more "
               "--write-threads or cores help, or --codec none: half the writers' CPU for a ~1.2x larger store; on "
               "a slow disk, --no-direct-io: the page cache takes what fits in memory)",
    "model": "the model limited this run: the loop was issuing the LPM's work (or waiting for the device) "
             "{share:.0%} of it",
}

Pipelines = Annotated[Optional[Path], option("Your own pipelines file, merged over the packaged pipelines.yaml.",
                                             DATA, default="$FPT_PIPELINES")]
Augment = Annotated[Optional[str], option("Side-input augmentation: paper, strong or none, with overrides such as "
                                          "paper,vflip=0.5,scale=0.6:1.", TRAINING, default="paper")]
DropLast = Annotated[Optional[bool], typer.Option("--drop-last/--keep-last", help="Drop each epoch's last partial "
                                                  "batch [default: drop, as the paper].", rich_help_panel=TRAINING)]


@app.command(cls=Command)
@friendly
def extract(
    dataset: Dataset = None,
    data: RawData = None,
    mean: Mean = None,
    std: Std = None,
    on_error: OnError = None,
    j2k_decode: J2kDecode = None,
    backbone: Backbone = None,
    weights: Weights = None,
    random_init: RandomInit = False,
    res: Res = None,
    layers: Layers = None,
    token_ratio: TokenRatio = None,
    importance: Importance = None,
    out: StoreOut = None,
    image_res: ImageRes = None,
    shard_size: ShardSize = None,
    overwrite: Overwrite = False,
    codec: Codec = None,
    direct_io: DirectIo = None,
    batch_size: ExtractBatch = None,
    device: Device = None,
    workers: DecodeWorkers = None,
    write_threads: WriteThreads = None,
    writers: Writers = None,
    precision: Precision = None,
    scheduler: Scheduler = None,
    pipelines: Pipelines = None,
):
    """Run the frozen LPM once over a dataset and write its important tokens' K/V to a Zarr store."""
    cfg = fpt_config.extract_config(
        dataset, data, pipelines, res=res, out=out, backbone=backbone, weights=weights,
        random_init=random_init or None,
        layers=fpt_config.parse_layers(layers), token_ratio=token_ratio, importance=importance,
        image_res=image_res, batch_size=batch_size, device=device, samples_per_shard=shard_size,
        mean=fpt_config.parse_normalization(mean, "mean"), std=fpt_config.parse_normalization(std, "std"),
        workers=workers, write_threads=write_threads, writers=writers, precision=precision, codec=codec,
        direct_io=direct_io, on_error=on_error, j2k_decode=j2k_decode, overwrite=overwrite or None)
    run_extract(cfg, scheduler, pipelines)


def run_train(cfg: fpt_config.TrainConfig) -> RunMetrics:
    from fpt.train import train

    with _progress() as progress:
        task = progress.add_task("train", total=cfg.epochs, rate="")
        batches = progress.add_task("reading the store", total=None, rate="")

        def start(info: dict):
            resumed = info["resumed_from_epoch"]
            console.print(f"{info['method']} on {info['device']}: {info['train']} train / {info['val']} val samples; "
                          f"cache {info['cache']['reason']}"
                          + (f"; resuming after epoch {resumed}" if resumed is not None else ""), highlight=False)
            if resumed is not None:
                progress.update(task, completed=resumed + 1)
            for warning in info["warnings"]:
                err.print(f"[bold yellow]WARNING:[/] {escape(warning)}", highlight=False, soft_wrap=True)

        def batch(epoch: int, done: int, total: int):
            progress.update(batches, description=f"epoch {epoch + 1}", completed=done, total=total,
                            rate="validating" if done == total else "")

        def update(record: dict):
            auc = record["val"]["auc"]
            progress.update(task, advance=1, rate=f"loss {record['loss']:.3f} val AUC "
                            f"{auc:.4f}" if auc is not None else f"loss {record['loss']:.3f}")
        metrics = train(cfg, on_epoch=update, on_start=start, on_batch=batch)
        progress.remove_task(batches)
    return metrics


@app.command("train", cls=Command)
@friendly
def train_cmd(
    store: Store = None,
    skip_corrupt: SkipCorrupt = False,
    method: Method = None,
    side_res: SideRes = None,
    prompts: Prompts = None,
    reduction: Reduction = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Annotated[Optional[str], option("AdamW learning rate (one value: grid-search several with `fpt sweep`).",
                                        TRAINING, default=f"the pipeline entry's, else {TR['lr']:g}",
                                        metavar="FLOAT")] = None,
    weight_decay: Annotated[Optional[str], option("AdamW weight decay (one value).", TRAINING,
                                                  default=f"{TR['weight_decay']:g}", metavar="FLOAT")] = None,
    seed: Seed = None,
    out: Annotated[Optional[Path], option("Run directory.", OUTPUT, default="runs/STORE-TIMESTAMP")] = None,
    resume: Annotated[Optional[Path], option("Continue the interrupted run in this directory.", OUTPUT)] = None,
    checkpoint_seconds: CheckpointSeconds = None,
    ft_memory_mb: FtMemory = None,
    device: Device = None,
    cache: Cache = None,
    cache_budget_mb: Annotated[Optional[float], option("Memory budget of --cache auto (MB).", HARDWARE,
                                                       default="half the free memory")] = None,
    workers: Annotated[Optional[int], option("Store-reading processes when streaming.", HARDWARE,
                                             default="chosen per device")] = None,
    compile: Compile = None,
    cuda_graph: CudaGraph = None,
    augment: Augment = None,
    drop_last: DropLast = None,
    pipelines: Pipelines = None,
):
    """Train the side network with fine-grained prompts (or a baseline) from a store; best checkpoint by val AUC,
    then test. An interrupted run continues with --resume RUN (or the same command with the same --out)."""
    options = dict(store=store, skip_corrupt=skip_corrupt or None, method=method, side_res=side_res, prompts=prompts,
                   reduction=reduction, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                   seed=seed, out=out, augment=augment, drop_last=drop_last, pipelines=pipelines, device=device,
                   cache=cache, cache_budget_mb=cache_budget_mb, workers=workers, ft_memory_mb=ft_memory_mb,
                   compile=compile, cuda_graph=cuda_graph, checkpoint_seconds=checkpoint_seconds)
    if resume is not None:
        from fpt.train import resume_config

        cfg = resume_config(resume, **fpt_config.resume_options(resume, options))
    else:
        numbers = {"lr": fpt_config.parse_number(lr, "lr"),
                   "weight_decay": fpt_config.parse_number(weight_decay, "weight-decay")}
        cfg = fpt_config.train_config_from_options(**{**options, **numbers})
    m = run_train(cfg)
    show_metrics([m])
    if m.diverged_epoch is not None and m.best_epoch < 0:
        raise FptError(f"training diverged in epoch {m.diverged_epoch} (its loss is not finite), before any epoch "
                       f"was validated: lower --lr (this run's: {cfg.lr:g})")
    if m.diverged_epoch is not None:
        err.print(f"[bold yellow]WARNING:[/] training diverged in epoch {m.diverged_epoch} (its loss is not finite) "
                  f"and stopped; the results are of epoch {m.best_epoch}, the best before it. A lower --lr (this "
                  f"run's: {cfg.lr:g}) may train further", highlight=False, soft_wrap=True)


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
        console.print(f"{m.method} run: {escape(str(m.run_dir))} (best epoch {m.best_epoch}: {m.best_reason})",
                      highlight=False)


@app.command(cls=Command)
@friendly
def evaluate(
    store: Annotated[str, typer.Option(help="Store (path or URL) to evaluate on.", rich_help_panel=DATA)],
    checkpoint: Annotated[Path, typer.Option(help="best.pt of a run on this store.", rich_help_panel=DATA)],
    split: Annotated[str, typer.Option(help="train, val or test.", rich_help_panel=DATA)] = "test",
    out: Annotated[Optional[Path], typer.Option(help="Also write the metrics to this JSON file, with OUT-roc.png and "
                                                "OUT-confusion.png beside it.", rich_help_panel=OUTPUT)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.", rich_help_panel=HARDWARE)] = "auto",
):
    """Evaluate a trained checkpoint on one split of a store."""
    from fpt.train import evaluate_checkpoint

    result = evaluate_checkpoint(store, checkpoint, split, device=device, out=out)
    table = Table(title=escape(f"{checkpoint} on {store} ({split}, n={result.n})"))
    for k in ("auc", "acc", "f1", "kappa", "precision", "recall"):
        table.add_column(k, justify="right")
    table.add_row(*("-" if result.metrics[k] is None else f"{result.metrics[k]:.4f}" for k in
                    ("auc", "acc", "f1", "kappa", "precision", "recall")))
    console.print(table)
    if out is not None:
        stem = out.with_suffix("")
        console.print(escape(f"wrote {out}, {stem}-roc.png, {stem}-confusion.png"), highlight=False)


@app.command(cls=Command)
@friendly
def sweep(
    store: Store = None,
    skip_corrupt: SkipCorrupt = False,
    method: Method = None,
    side_res: SideRes = None,
    prompts: Prompts = None,
    reduction: Reduction = None,
    lr: Annotated[Optional[str], option("Learning rates to grid-search, e.g. 1e-4,5e-4,1e-3.", TRAINING,
                                        default="the published lr x 0.5, 1, 2", metavar="LIST")] = None,
    weight_decay: Annotated[Optional[str], option("Weight decays to grid-search, e.g. 0,0.05.", TRAINING,
                                                  default="the pipeline's sweep grid", metavar="LIST")] = None,
    seeds: Annotated[Optional[int], option("Repeats of the best configuration (seed, seed+1, ...).", TRAINING,
                                           default=DEFAULTS["sweep"].get("seeds"))] = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    out: Annotated[Optional[Path], option("Sweep directory.", OUTPUT, default="sweeps/STORE-METHOD")] = None,
    ft_memory_mb: FtMemory = None,
    device: Device = None,
    cache: Cache = None,
    scheduler: Annotated[Optional[str], option("local (N from the GPU/CPU count), local:N or a dask scheduler "
                                               "address.", HARDWARE, default=DEFAULTS["sweep"].get("scheduler"))
                         ] = None,
    compile: Compile = None,
    cuda_graph: CudaGraph = None,
    runs_per_gpu: Annotated[Optional[int], option("Runs trained at once on each GPU of a local scheduler.", HARDWARE,
                                                  default="from free GPU memory and the step's measured peak")] = None,
    runs_in: Annotated[Optional[str], option("How a local scheduler runs concurrent runs: threads (of this "
                                             "process, a CUDA stream each: their kernels overlap) or processes.",
                                             HARDWARE, default="threads on CUDA without --compile, else processes",
                                             metavar="threads|processes")] = None,
    augment: Augment = None,
    drop_last: DropLast = None,
    checkpoint_seconds: CheckpointSeconds = None,
    pipelines: Pipelines = None,
):
    """The paper's protocol: grid-search lr x weight decay on val AUC, repeat the best over seeds, report test
    mean ± std. Runs are dask tasks; re-running the same command resumes, skipping finished runs."""
    from fpt.train.sweep import run_sweep

    cfg = fpt_config.sweep_config_from_options(
        store, lr=lr, weight_decay=weight_decay, seeds=seeds, scheduler=scheduler, out=out, method=method,
        side_res=side_res, prompts=prompts, reduction=reduction, epochs=epochs, batch_size=batch_size, seed=seed,
        device=device, cache=cache, ft_memory_mb=ft_memory_mb, skip_corrupt=skip_corrupt or None, compile=compile,
        cuda_graph=cuda_graph, runs_per_gpu=runs_per_gpu, runs_in=runs_in, augment=augment, drop_last=drop_last,
        checkpoint_seconds=checkpoint_seconds, pipelines=pipelines)
    with _progress() as progress:
        task = progress.add_task("sweep", total=None, rate="")

        def stage(name: str, n: int):
            progress.update(task, description=f"sweep: {name}", total=(progress.tasks[task].total or 0) + n)

        def done(run, metrics, skipped: bool):
            progress.update(task, advance=1, rate=f"{run.name} {'(finished before)' if skipped else ''}")
        summary = run_sweep(cfg, on_run=done, on_stage=stage,
                            on_note=lambda text: console.print(escape(text), highlight=False))
    show_sweep(summary)


def show_sweep(s: "SweepSummary") -> None:
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    grid = Table(title=f"grid ({s.method}, selection by val AUC)")
    for col in ("lr", "weight decay", "val AUC", ""):
        grid.add_column(col, justify="right")
    for g in s.grid:
        best = (g.lr, g.weight_decay) == (s.best_lr, s.best_weight_decay)
        grid.add_row(f"{g.lr:g}", f"{g.weight_decay:g}", fmt(g.val_score), "best" if best else "")
    console.print(grid)
    table = Table(title=f"test over {len(s.seeds)} seeds: lr {s.best_lr:g}, "
                        f"weight decay {s.best_weight_decay:g} (mean ± std)")
    for col in ("metric", "mean ± std", *(f"seed {r.seed}" for r in s.seeds)):
        table.add_column(col, justify="left" if col == "metric" else "right", no_wrap=True)
    for k, stat in s.test.items():
        mean_std = "-" if stat.mean is None else f"{stat.mean:.4f} ± {stat.std:.4f}"
        table.add_row(k, mean_std, *(fmt(r.test[k]) for r in s.seeds))
    e, p = s.efficiency, s.params
    table.add_row("PPE / PME", f"{fmt(e['ppe'])} / {fmt(e['pme'])}")
    table.add_row("learnable", f"{p['learnable']:,} ({p['ratio_percent']:.2f} %)")
    console.print(table)
    console.print(f"{s.ran} runs trained, {s.skipped} finished before; "
                  f"results: {escape(str(Path(s.config['out']) / 'sweep.json'))}, sweep.csv", highlight=False)


@app.command(cls=Command)
@friendly
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files, folders (recursive) or CSV files with a path "
                                                 "column.")],
    checkpoint: Annotated[Path, typer.Option(help="best.pt of a training run.", rich_help_panel=DATA)],
    weights: Weights = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="The store's LPM was random-init (seeded).",
                                              rich_help_panel=LPM)] = False,
    out: Annotated[Optional[Path], typer.Option(help="Also write the probabilities to a .csv or .json file.",
                                                rich_help_panel=OUTPUT)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per LPM forward pass.", rich_help_panel=HARDWARE)] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.", rich_help_panel=HARDWARE)] = "auto",
):
    """Class probabilities per image: the LPM at the store's resolution and selection, then the trained model."""
    from fpt.predict import check_output, predict_images, write_predictions

    if out is not None:
        check_output(out)
    with console.status(escape(f"loading the LPM of {checkpoint} and running it over the images")):
        result = predict_images(checkpoint, images, weights, random_init, device, batch_size)
    table = Table(title=escape(f"{result.method} predictions ({checkpoint})"))
    for col in ("image", "prediction", *result.classes):
        table.add_column(escape(col), justify="left" if col in ("image", "prediction") else "right")
    for row in result.rows:
        table.add_row(escape(row.image), escape(row.prediction),
                      *(f"{row.probabilities[c]:.4f}" for c in result.classes))
    console.print(table)
    if out is not None:
        write_predictions(result, out)
        console.print(escape(f"wrote {out}"))


@app.command(cls=Command)
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

    console.print(escape(f"wrote {draw(store, sample, out, checkpoint, layer, head, tile)}"))


def _integrity_line(report) -> str:
    if report.ok:
        return "ok: every chunk read and checksummed" if report.full else \
            "files present (pass --verify to checksum every chunk)"
    return f"[bold red]{len(report.bad_samples)} samples affected[/] (see below)"


def show_problems(report) -> None:
    table = Table(title=f"[red]problems in {escape(report.path)}")
    for col in ("array", "problem", "samples", "first affected"):
        table.add_column(col)
    for p in report.problems:
        first = report.named(p.samples[:3])
        table.add_row(p.array, escape(p.reason), str(len(p.samples)),
                      escape(", ".join(first) + (" …" if len(p.samples) > 3 else "")))
    console.print(table)


store_app = typer.Typer(help="Store maintenance.", no_args_is_help=True, cls=Group)
app.add_typer(store_app, name="store")


@store_app.command("verify", cls=Command)
@friendly
def store_verify(path: str = typer.Argument(..., help="Store path or URL."),
                 repair: bool = typer.Option(False, "--repair", help="Mark the shards of missing or corrupt samples "
                                             "as not done; the same `fpt extract` command then rewrites them.")):
    """Read every chunk of a store and check its crc32c checksum; exit 1 when any sample is unfinished, missing
    or corrupt."""
    from fpt.store import mark_for_reextraction
    from fpt.store import verify as verify_store

    with _progress() as progress:
        task = progress.add_task("verify", total=None, rate="")
        report = verify_store(path, progress=lambda done, total: progress.update(task, completed=done, total=total))
    if report.ok:
        console.print(escape(report.summary()))
        return
    show_problems(report)
    if repair and len(report.damaged):
        shards = mark_for_reextraction(path)
        err.print(f"[bold yellow]marked {len(shards)} shard(s) for re-extraction[/]: re-run the same `fpt extract` "
                  "command to rewrite them", highlight=False, soft_wrap=True)
    else:
        err.print(f"[bold red]{escape(report.summary())}[/]", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def _last_run_line(run: dict) -> str:
    """The store's last extraction run (its ``last_run`` attrs) in one line."""
    steady = f", {run['steady_images_per_s']:.3g} after the first shard" if run.get("steady_images_per_s") else ""
    limit = f", limited by {run['limited_by']}" if run.get("limited_by") else ""
    return (f"{run['samples']} samples in {run['seconds']:.1f} s on {run['device']} ({run['images_per_s']:.3g} "
            f"images/s{steady}{limit})")


def _kv_codecs(arrays: list[dict], name: str | None) -> str:
    """The K/V's codecs with their settings (what decides the store's size and write speed), after the --codec
    ``name`` the store was created with (stores from before it was recorded have none)."""
    keys = next((a for a in arrays if a["name"] == "keys"), None)
    chain = " + ".join(c for c in keys["codecs"] if c != "bytes") if keys else "unreadable"
    return f"--codec {name}: {chain}" if name else chain


def arrays_table(arrays: list[dict]) -> Table:
    """The store's arrays, readable at 80 columns: chunk and shard in samples (every other axis is whole in each
    chunk), codec names without settings (the header's compression line has them for the K/V) and without the
    plain ``bytes`` serialiser, wrapped when the terminal is narrow."""
    table = Table(title="arrays", caption="chunk/shard: samples per chunk / per shard file (- = not sharded)",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("array", "shape", "dtype", "chunk/shard", "codecs", "raw", "disk"):
        table.add_column(col, no_wrap=col != "codecs", overflow="fold",
                         justify="right" if col in ("raw", "disk") else "left")
    for r in sorted(arrays, key=lambda r: r["name"]):
        codecs = [c for c in r["codec_names"] if c != "bytes"]
        table.add_row(r["name"], "×".join(map(str, r["shape"])), r["dtype"].replace("StringDType()", "string"),
                      f"{r['chunks'][0]}/{r['shards'][0] if r['shards'] else '-'}", " ".join(codecs),
                      _bytes(r["raw_bytes"]) if r["raw_bytes"] else "-", _bytes(r["disk_bytes"]))
    return table


@app.command(cls=Command)
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
    report = verify_store(path, full=verify)
    if as_json:
        s["integrity"] = {"full": report.full, "bad_samples": report.bad_samples.tolist(),
                          "problems": [p.__dict__ for p in report.problems]}
        console.print_json(json.dumps(s, default=str))
        return
    a = s["attrs"]
    bb, ex = a["backbone"], a["extraction"]
    head = Table.grid(padding=(0, 2))
    head.add_column(no_wrap=True)
    head.add_column(overflow="fold")                 # long paths and names wrap instead of losing their end
    for k, v in [("store", escape(s["path"])), ("schema version", a["fpt_store_version"]), ("fpt", a["fpt_version"]),
                 ("created", a["created"]),
                 ("backbone", f"{escape(bb['name'])} ({bb.get('family', 'vit')} family, {bb['weights_source']}, "
                              f"{bb['n_params']:,} params, "
                              f"D={bb['embed_dim']}, H={bb['heads']}, d={bb['head_dim']}, patch {bb['patch_size']})"),
                 ("weights sha256", bb["weights_sha256"][:16] + "…"),
                 ("extraction", f"res {ex['res']}, layers {ex['layers']}, token ratio {ex['token_ratio']} "
                                f"-> k={ex['k']}, importance {ex['importance']}, "
                                + (f"{ex['precision']} arithmetic, " if "precision" in ex else "")
                                + ("JPEG 2000 decoded reduced, " if ex.get("j2k_decode") == "reduced" else "")
                                + f"low-res {ex['image_res']} px"),
                 ("complete", f"unknown (the done array is unreadable) of {s['n_samples']} samples"
                  if s["done"] is None else f"{s['done']}/{s['n_samples']} samples"
                  + ("" if s["done"] == s["n_samples"] else "  [yellow](re-run extract to finish)[/]")),
                 ("integrity", _integrity_line(report)),
                 ("compression", _kv_codecs(s["arrays"], a.get("storage", {}).get("codec"))),
                 ("size", f"{_bytes(s['disk_bytes'])} on disk, {_bytes(s['raw_bytes'])} raw "
                          f"({s['disk_bytes'] / max(1, s['raw_bytes']):.2f}x), "
                          f"{_bytes(s['disk_bytes'] / max(1, s['n_samples']))} per sample"),
                 *([("last run", _last_run_line(a["last_run"]))] if a.get("last_run") else [])]:
        head.add_row(f"[bold]{k}", str(v))
    if bb["random_init"]:
        head.add_row("[bold red]warning", "[red]random-init LPM: no pre-trained knowledge")
    for warning in a["dataset"].get("warnings", []):          # recorded at extraction (e.g. a class missing in val)
        head.add_row("[bold yellow]warning", f"[yellow]{escape(warning)}")
    console.print(head)
    if not report.ok:
        show_problems(report)
    if s["counts"] is None:
        return
    counts = Table(title="samples per split and class")
    classes = a["dataset"]["classes"]
    counts.add_column("split")
    for c in classes:
        counts.add_column(escape(c), justify="right")
    counts.add_column("total", justify="right")
    for split, row in s["counts"].items():
        counts.add_row(split, *(str(row[c]) for c in classes), str(sum(row.values())))
    console.print(counts)
    arrays = arrays_table(s["arrays"])
    console.print(arrays)


@app.command(cls=Command)
@friendly
def demo(out_dir: Path = typer.Option(Path("fpt-demo"), help="Where the demo store and runs go."),
         epochs: Optional[int] = typer.Option(None, min=1,
                                              help="Training epochs [default: pipelines.yaml demo entry]."),
         device: Device = None):
    """Generate the synthetic fine-texture task, extract it with a small random ViT, train FPT+ and the side
    network alone, and compare their test AUC."""
    store = str(out_dir / "demo.zarr")
    run_extract(fpt_config.extract_config("demo", out=store, device=device))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    runs = []
    for name, prompts in (("fpt+", None), ("side-only", 0)):
        console.rule(f"train {name}")
        cfg = fpt_config.train_config_from_options(store, out=out_dir / "runs" / f"{name}-{stamp}", prompts=prompts,
                                                   epochs=epochs, device=device)
        runs.append(run_train(cfg))
    show_metrics(runs)
    console.print(f"store: [bold]{escape(store)}[/]  (try `fpt inspect {escape(store)}`)")


if __name__ == "__main__":
    app()
