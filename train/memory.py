"""Peak memory of training: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak resident set size
(sampled by a thread) on a CPU; and a measurement of ``fpt train``'s own training step (``TrainStep``) for a
given model shape (the paper's setting).

``python -m fpt.train.memory`` measures the paper's setting (ViT-B-shaped K/V: L=6, H=12, k=205, d=64; side
128 px; batch 16; 16 prompts) on this machine's device (on CUDA through the captured step and one replay)."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import psutil
import torch

from fpt.train.data import SideInput
from fpt.train.model import ModelSpec, parameter_counts, seeded_model, use_generator
from fpt.train.step import GRAPH_WARMUP, TrainStep, make_optimizer

MB = 2**20


class PeakMemory:
    """Context manager tracking the peak memory of the block on ``device``.

    CUDA: peak of ``torch.cuda.max_memory_allocated`` (tensors only, the figure papers report), reset on entry.
    CPU: peak RSS of this process, sampled every ``interval`` seconds by a thread (plus on entry and exit);
    ``baseline_mb`` is the RSS on entry, so ``peak_mb - baseline_mb`` is what the block added.

    Both are figures of the whole process: when blocks overlap in one process (a sweep's runs in threads), each
    is ``shared`` (its ``kind`` ends in ``_shared``): its peak includes what the others held, and CUDA's peak is
    reset only by a block that enters alone.
    """

    _active: set["PeakMemory"] = set()           # the blocks now open in this process
    _lock = threading.Lock()

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.shared, self._closed = False, False
        self.baseline_mb = self._peak = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def kind(self) -> str:
        return ("cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss") + \
            ("_shared" if self.shared else "")

    def _rss(self) -> float:
        return psutil.Process().memory_info().rss / MB

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._rss())

    def __enter__(self) -> "PeakMemory":
        with PeakMemory._lock:
            others = set(PeakMemory._active)
            PeakMemory._active.add(self)
            if others:
                for block in (*others, self):
                    block.shared = True
        if self.device.type == "cuda":
            if not others:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / MB
        else:
            self.baseline_mb = self._peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with PeakMemory._lock:
            PeakMemory._active.discard(self)
        if self.device.type == "cuda":
            self._peak = torch.cuda.max_memory_allocated(self.device) / MB     # before another block resets it
            self._closed = True
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._rss())

    @property
    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return self._peak if self._closed else torch.cuda.max_memory_allocated(self.device) / MB
        return max(self._peak, self._rss()) if self._thread is not None and self._thread.is_alive() else self._peak

    def as_dict(self) -> dict:
        return {"peak_mb": round(self.peak_mb, 1), "baseline_mb": round(self.baseline_mb, 1), "kind": self.kind}


@dataclass
class StepShape:
    """The data shape of one training step."""
    batch_size: int = 16
    layers: int = 6
    heads: int = 12
    k: int = 205
    head_dim: int = 64
    image_res: int = 256     # stored low-res copy (augmented down to the side resolution)


PAPER_SPEC = ModelSpec(lpm_dim=768, lpm_heads=12, head_dim=64, patch_size=16, layers=6, n_classes=2, side_res=128,
                       prompts=16, reduction=8)


def step_batch(spec: ModelSpec, shape: StepShape, device: torch.device, generator: torch.Generator | None = None
               ) -> dict[str, torch.Tensor]:
    """A batch of random store arrays of ``shape`` (what a store batch holds: uint8 images, fp16 K/V) on
    ``device``, drawn on the CPU from ``generator`` (default: torch's global one)."""
    B, g = shape.batch_size, generator
    kv_shape = (B, shape.layers, shape.heads, shape.k, shape.head_dim)
    batch = {"images": torch.randint(0, 256, (B, 3, shape.image_res, shape.image_res), dtype=torch.uint8,
                                     generator=g),
             "keys": torch.randn(kv_shape, generator=g).half(), "values": torch.randn(kv_shape, generator=g).half(),
             "cls": torch.randn(B, spec.lpm_dim, generator=g).half(),
             "labels": torch.randint(0, spec.n_classes, (B,), generator=g)}
    return {n: t.to(device) for n, t in batch.items()}


def make_step(spec: ModelSpec, device: torch.device, compile: bool = False, steps: int = 1,
              seed: int = 0, cuda_graph: bool | None = None) -> TrainStep:
    """The training step of ``fpt train`` (AdamW, cosine schedule over ``steps``, clip) for a new model ``spec``
    (its weights and dropout drawn from generators seeded with ``seed``, as ``fpt train`` makes them);
    ``cuda_graph`` as ``TrainStep``'s (default: captured on CUDA, from its GRAPH_WARMUP + 1-th step)."""
    model = seeded_model(spec, seed).to(device)
    use_generator(model, torch.Generator(device).manual_seed(seed))
    optimizer, schedule = make_optimizer(model, 1e-3, 0.05, steps, device)
    side_input = SideInput(spec.side_res, (0.5,) * 3, (0.25,) * 3, seed=seed)
    return TrainStep(model, side_input, optimizer, schedule, compile=compile, cuda_graph=cuda_graph)


def measure_training_step(spec: ModelSpec = PAPER_SPEC, shape: StepShape = StepShape(),
                          device: torch.device = torch.device("cpu"), steps: int = 1, seed: int = 0,
                          compile: bool = False) -> dict:
    """Peak memory of ``steps`` steps of ``fpt train``'s training step (augmentation, forward, backward, clip,
    AdamW, schedule) of the model ``spec`` on a batch of random data of ``shape``, everything created inside
    the measurement."""
    torch.manual_seed(seed)
    with PeakMemory(device) as mem:
        step = make_step(spec, device, compile, steps, seed)
        batch = step_batch(spec, shape, device)
        draws = step.side_input.draw(steps, shape.batch_size).to(device)
        # each step's loss (a copy: a captured step's output tensor is rewritten by the next replay), read after
        losses = [step(batch, draws[i]).clone() for i in range(steps)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        captured = step.is_captured
        step.release()
    return {**mem.as_dict(), "added_mb": round(mem.peak_mb - mem.baseline_mb, 1), "device": str(device),
            "learnable": parameter_counts(step.model, 0)["learnable"], "compiled": step.is_compiled,
            "captured": captured, "steps": steps, "losses": [round(float(loss), 6) for loss in losses],
            "spec": spec.as_dict(), "shape": vars(shape)}


if __name__ == "__main__":
    import json

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # on CUDA: the eager warm-up steps, the captured one and a replay, as fpt train runs them
    print(json.dumps(measure_training_step(device=dev, steps=GRAPH_WARMUP + 2 if dev.type == "cuda" else 1),
                     indent=2))
