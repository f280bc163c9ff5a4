"""The training step, one for every caller (``fpt train``, the memory measurement, the benches): augmentation,
forward, cross-entropy, backward, gradient-norm clip, AdamW, cosine schedule; and the evaluation forward.

On CUDA the whole step (augmentation, forward, backward, clip and AdamW's fused update) is captured once as a
CUDA graph and replayed (``StepGraph``: one launch instead of hundreds, so a small side network is not bound by
Python's kernel launches), and so is the evaluation forward. Shapes are static for that — training batches are
full (the last partial batch is dropped; one that is not runs eagerly) and evaluation batches are padded to the
batch size. ``compile`` adds torch.compile (default mode) of the forward and backward, inside the graph on CUDA:
faster steps for a compilation of tens of seconds per run, so off by default. Elsewhere the step runs eagerly.
When compiling or capturing fails the step says so in one warning and runs eagerly.
"""
from __future__ import annotations

import gc
import threading
import warnings
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F

from fpt import FptError
from fpt.train.data import Batch, SideInput
from fpt.train.model import LinearProbe, SideNetwork, seeded_dropouts

CLIP_NORM = 1.0
GRAPH_WARMUP = 3        # eager calls before a capture: the allocator, cuBLAS's workspaces and AdamW's state settle
# Held while a StepGraph warms up, captures, replays or releases its graph. Runs that share a process (a sweep's
# threads) then never capture two graphs at once (a capture registers the device's default generator, which torch
# before its per-capture RNG states, pytorch#176752, lets one capture at a time hold) and never destroy a graph
# during another's capture (destroying one is not permitted then, and invalidates the capture). Replays only
# enqueue work, so holding it there costs microseconds.
GRAPH_LOCK = threading.RLock()
# torch.cuda.Stream() hands out one of a fixed pool of streams per device and priority (32 in torch 2.11),
# round-robin: the 33rd is the first again. Lease 5's 12-run sweep drew 3 per run, so one run captured its graph
# on the stream another run was copying on, and the copy failed. STREAMS_HELD: the (device, stream id) of the
# streams ``stream_of_its_own`` has handed out and not yet had back.
STREAMS_HELD: set[tuple[int, int]] = set()
_STREAMS_LOCK = threading.Lock()
POOL_DRAWS = 128        # draws before giving up: more than the pool holds, so every stream in it is looked at


@contextmanager
def stream_of_its_own(device: torch.device, new_stream: Callable[[], torch.cuda.Stream] | None = None
                      ) -> Iterator[torch.cuda.Stream]:
    """A CUDA stream of torch's pool on ``device`` that no other holder of one of these has meanwhile: each of a
    sweep's runs in threads runs, warms up and captures on one. FptError when every stream of the pool is held.
    (``new_stream``: what draws from the pool; tests give a pool of their own.)"""
    draw = new_stream or partial(torch.cuda.Stream, device)
    with _STREAMS_LOCK:
        for _ in range(POOL_DRAWS):
            stream = draw()
            key = (stream.device_index, stream.stream_id)
            if key not in STREAMS_HELD:
                STREAMS_HELD.add(key)
                break
        else:
            raise FptError(f"no CUDA stream of its own is left on {device} for another run ({len(STREAMS_HELD)} "
                           "are held): run fewer at once (--scheduler local:N)")
    try:
        yield stream
    finally:
        with _STREAMS_LOCK:
            STREAMS_HELD.discard(key)


def capture_stream() -> torch.cuda.Stream:
    """Where a StepGraph warms up and captures: the current stream when it is one of ``stream_of_its_own`` (a
    sweep's run in a thread), else one more of torch's pool (a run alone in its process, on the default
    stream)."""
    current = torch.cuda.current_stream()
    return current if (current.device_index, current.stream_id) in STREAMS_HELD else torch.cuda.Stream()


def step_compiles(compile: bool | None) -> bool:
    """Whether a run's step is compiled: ``compile`` as given (``--compile`` / ``--no-compile``); off by default
    (on CUDA the captured step is fast without it, and compiling costs each run tens of seconds)."""
    return bool(compile)


def step_captures(cuda_graph: bool | None, device: torch.device) -> bool:
    """Whether a run's step is captured as a CUDA graph: ``cuda_graph`` as given (``--cuda-graph`` /
    ``--no-cuda-graph``), by default on CUDA devices."""
    if cuda_graph and device.type != "cuda":
        raise FptError(f"--cuda-graph needs a CUDA device (this run's device is {device})")
    return device.type == "cuda" if cuda_graph is None else cuda_graph


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, total_steps: int,
                   device: torch.device) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """AdamW (its fused kernel on CUDA) and the cosine schedule over ``total_steps`` steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                  **({"fused": True} if device.type == "cuda" else {}))
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))


class CompiledOrEager:
    """``fn`` compiled with ``torch.compile`` (static shapes) on first use, or ``fn`` itself when ``compile`` is
    off or compiling fails (then one warning names the reason and the rest of the run is eager)."""

    def __init__(self, fn: Callable, compile: bool, what: str):
        self.eager, self.what, self.compiled = fn, what, None
        if compile:
            try:
                self.compiled = torch.compile(fn, dynamic=False)
            except Exception as e:          # noqa: BLE001 - torch.compile unavailable here (platform, Python)
                self._fall_back(e)
        self._tried = False

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    def fall_back(self, error: BaseException) -> None:
        """Run eagerly from now on, saying why once."""
        if self.compiled is not None:
            self._fall_back(error)

    def _fall_back(self, error: BaseException) -> None:
        warnings.warn(f"torch.compile of the {self.what} failed ({first_line(error)}); running it eagerly "
                      "(--no-compile skips the attempt)", RuntimeWarning, stacklevel=3)
        self.compiled = None

    def __call__(self, *args):
        if self.compiled is None:
            return self.eager(*args)
        if self._tried:
            return self.compiled(*args)
        self._tried = True
        try:
            return self.compiled(*args)
        except Exception as e:              # noqa: BLE001 - compilation failed (compiler, backend): eager from now on
            self._fall_back(e)
            return self.eager(*args)


def first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: " + (str(error).strip().splitlines() or [""])[0][:200]


class StepGraph:
    """``fn(inputs) -> tensor`` replayed from one CUDA graph, ``inputs`` a dict of device tensors.

    The first ``warmup`` calls run ``fn`` eagerly on a side stream (as capturing needs); the next is captured
    (inside ``around_capture()``) and replayed, and every call after it copies its inputs into the captured ones
    and replays: no kernel launches but the copies. The captured call's inputs become the graph's (no copy of
    them is kept); a later call that passes tensors in the same memory again (a batch gathered into it, as
    ``batches(reuse=True)`` does) copies nothing. The result is the graph's own tensor, overwritten by the next
    replay. A call whose inputs differ in shape or dtype from the captured ones runs ``fn`` eagerly. If capturing
    fails, one warning says why and ``fn`` runs eagerly from then on. Off CUDA (``enabled`` False) ``fn`` runs as
    it is. ``generators``: the CUDA generators ``fn`` draws from besides the device's default one (each replay
    advances them as the captured call did)."""

    def __init__(self, fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], enabled: bool, what: str,
                 warmup: int = GRAPH_WARMUP, around_capture: Callable[[], ContextManager] = nullcontext,
                 generators: tuple[torch.Generator, ...] = ()):
        self.fn, self.enabled, self.what, self.warmup, self.around_capture = fn, enabled, what, warmup, around_capture
        self.generators = generators
        self.calls = 0
        self.side: torch.cuda.Stream | None = None      # where the warm-up calls run and the capture (capture_stream)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, torch.Tensor] = {}
        self.output: torch.Tensor | None = None

    @property
    def is_captured(self) -> bool:
        return self.graph is not None

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.graph is None and not self.enabled:
            return self.fn(inputs)
        # the inputs' device current: its streams, and its random generator, which a capture may draw from only
        # when its device is the current one (a run on cuda:1)
        with torch.cuda.device(next(iter(inputs.values())).device), GRAPH_LOCK:
            return self._call(inputs)

    def _call(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.graph is not None:
            if not self._fits(inputs):
                return self.fn(inputs)
            for name, t in inputs.items():
                if not same_memory(t, self.static[name]):
                    self.static[name].copy_(t, non_blocking=True)
            self.graph.replay()
            return self.output
        self.calls += 1
        if self.calls <= self.warmup:
            return self._on_side_stream(inputs)
        try:
            return self._capture(inputs)
        except Exception as e:          # noqa: BLE001 - an op that cannot be captured: eager from now on
            self.enabled, self.graph, self.static, self.output = False, None, {}, None
            warnings.warn(f"capturing the {self.what} as a CUDA graph failed ({first_line(e)}); running it "
                          "eagerly (--no-cuda-graph skips the attempt)", RuntimeWarning, stacklevel=3)
            return self.fn(inputs)

    def release(self) -> None:
        """Destroy the captured graph and free its memory now (under ``GRAPH_LOCK``, so never during another
        thread's capture); a later call captures again."""
        with GRAPH_LOCK:
            self.graph, self.static, self.output, self.calls = None, {}, None, 0

    def _fits(self, inputs: dict[str, torch.Tensor]) -> bool:
        return inputs.keys() == self.static.keys() and all(
            t.shape == self.static[n].shape and t.dtype == self.static[n].dtype for n, t in inputs.items())

    def _on_side_stream(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        current = torch.cuda.current_stream()
        self.side = self.side or capture_stream()
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            out = self.fn(inputs)
        current.wait_stream(self.side)
        return out

    def _capture(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        static = dict(inputs)
        self.side = self.side or capture_stream()
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            if generator.device.type == "cuda" and hasattr(graph, "register_generator_state"):
                graph.register_generator_state(generator)           # (newer torch registers them by itself)
        # thread_local: other threads' CUDA work goes on meanwhile (the other runs of a sweep's process); in the
        # default "global" mode it would break the capture, or fail itself. The capture stream is this graph's
        # own side stream, not torch's one for the process. Python's cyclic GC is off meanwhile: collecting a
        # dead graph (a finished run's, held in a reference cycle) would destroy it inside this capture.
        collecting = gc.isenabled()
        gc.disable()
        try:
            with self.around_capture(), torch.cuda.graph(graph, stream=self.side, capture_error_mode="thread_local"):
                output = self.fn(static)
        finally:
            if collecting:
                gc.enable()
        self.graph, self.static, self.output = graph, static, output
        graph.replay()                  # capturing recorded this call's work; this runs it
        return output


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (of one shape) are views of the same elements."""
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


class TrainStep:
    """``step(batch, draws) -> loss``: one optimisation step of ``model`` on a batch of store arrays (on the
    training device), with the side network's augmentation from ``draws`` [DRAWS, B] (``SideInput.draw``).
    Returns the loss as a detached device tensor of its own (no host sync). ``step.probabilities(batch)`` is
    the evaluation forward (softmax [B, C]).

    ``compile``: compile forward+backward (and the evaluation forward) with torch.compile; ``cuda_graph``:
    capture the whole step and the evaluation forward as CUDA graphs (``StepGraph``; default: on CUDA). The
    optimizer's lr is read by the captured AdamW from a device tensor, set from the schedule before each step
    (one lr for every parameter group, as ``make_optimizer`` makes them)."""

    def __init__(self, model: SideNetwork | LinearProbe, side_input: SideInput, optimizer: torch.optim.Optimizer,
                 schedule: torch.optim.lr_scheduler.LRScheduler | None = None, compile: bool = False,
                 cuda_graph: bool | None = None, clip_norm: float = CLIP_NORM):
        self.model, self.side_input, self.optimizer, self.schedule = model, side_input, optimizer, schedule
        self.clip_norm = clip_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        device = next(model.parameters()).device
        side_input.to(device)
        captures = step_captures(cuda_graph, device) and optimizer is not None
        # AdamW inside a graph keeps its step count and lr on the device; set either way, since a restored
        # optimizer state brings the option of the run that saved it (a CPU run cannot use it)
        for group in optimizer.param_groups if optimizer is not None else ():
            group["capturable"] = captures
        self.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), device=device) if captures else None
        self._loss = CompiledOrEager(self.loss, compile, "training step")
        self._proven = False                # a whole step (forward and backward) ran
        self._probabilities = CompiledOrEager(self.eval_probabilities, compile, "evaluation forward")
        self._dropouts = seeded_dropouts(model)
        for m in self._dropouts:        # compiled: masks drawn outside the compiled function (no graph break)
            m.draws_ahead = self._loss.is_compiled
        generators = tuple({id(m.generator): m.generator for m in self._dropouts
                            if m.generator is not None}.values())
        self._step_graph = StepGraph(self._update, captures, "training step",
                                     around_capture=self._lr_from_tensor, generators=generators)
        self._eval_graph = StepGraph(self._probabilities, captures, "evaluation forward")

    @property
    def is_compiled(self) -> bool:
        return self._loss.is_compiled

    @property
    def is_captured(self) -> bool:
        """Whether the training step runs from a CUDA graph (once it has been captured)."""
        return self._step_graph.is_captured

    @property
    def static_shapes(self) -> bool:
        """Whether evaluation batches should come padded to the batch size (compiled or captured)."""
        return self._loss.is_compiled or self._step_graph.enabled

    def loss(self, batch: Batch, draws: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the model on the augmented batch (what is compiled)."""
        logits = self.model.forward_batch(batch, partial(self.side_input, train=True, draws=draws))
        return F.cross_entropy(logits, batch["labels"])

    def eval_probabilities(self, batch: Batch) -> torch.Tensor:
        """The evaluation forward as written (what ``probabilities`` compiles or captures): class probabilities
        [B, C] of the batch as given, padding rows included."""
        return self.model.forward_batch(batch, partial(self.side_input, train=False)).float().softmax(-1)

    def _forward_backward(self, batch: Batch, draws: torch.Tensor) -> torch.Tensor:
        for m in self._dropouts:
            if m.draws_ahead:
                m.draw_ahead(len(batch["labels"]))
        loss = self._loss(batch, draws)
        loss.backward()
        return loss

    def _update(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward, backward, clip, AdamW on ``inputs`` (a batch + its ``draws``): what is captured. The
        gradients start as None, in the captured step too, whose backward then allocates them in the graph's
        memory (and writes, not adds, them at each replay)."""
        self.optimizer.zero_grad(set_to_none=True)
        batch = {k: v for k, v in inputs.items() if k != "draws"}
        if self._proven or not self._loss.is_compiled:
            loss = self._forward_backward(batch, inputs["draws"])
        else:       # the backward compiles on its first call: a failure there falls back to eager too
            try:
                loss = self._forward_backward(batch, inputs["draws"])
            except Exception as e:          # noqa: BLE001
                self._loss.fall_back(e)
                loss = self._forward_backward(batch, inputs["draws"])
            self._proven = True
        torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.optimizer.step()
        return loss.detach()

    @contextmanager
    def _lr_from_tensor(self) -> Iterator[None]:
        """While capturing, AdamW's lr is the device tensor ``self.lr`` (a float would be fixed in the graph);
        the schedule keeps updating a float, copied into the tensor before each step."""
        groups = self.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = self.lr
        try:
            yield
        finally:
            for g, lr in zip(groups, floats):
                g["lr"] = lr

    def __call__(self, batch: Batch, draws: torch.Tensor) -> torch.Tensor:
        if self._step_graph.enabled:
            self.lr.fill_(float(self.optimizer.param_groups[0]["lr"]))
        loss = self._step_graph({**batch, "draws": draws})
        # released right after the update, not at the next step: no gradient stays alive into evaluation (in a
        # captured step they live in the graph's own memory, which the next replay rewrites)
        self.optimizer.zero_grad(set_to_none=True)
        if self.schedule is not None:
            self.schedule.step()
        return loss.clone()        # a CUDA graph's output is overwritten by its next replay

    def release(self) -> None:
        """Free the captured graphs now (``StepGraph.release``), rather than whenever Python's cyclic GC gets to
        this step (its graphs refer back to it): a graph destroyed during a capture invalidates it."""
        self._step_graph.release()
        self._eval_graph.release()

    @torch.no_grad()
    def probabilities(self, batch: Batch, batch_size: int | None = None) -> torch.Tensor:
        """Class probabilities [n, C] of a batch of n samples; with ``batch_size`` a compiled or captured
        evaluation pads the batch to that size first (one static shape)."""
        n = len(batch["labels"])
        if batch_size is not None and n < batch_size and self.static_shapes:
            batch = pad_batch(batch, batch_size)
        return self._eval_graph(batch)[:n].clone()


def pad_batch(batch: Batch, size: int) -> Batch:
    """A batch of n < ``size`` samples padded to ``size`` by repeating its last sample (the padded rows' outputs
    are dropped): evaluation keeps one static shape."""
    n = len(batch["labels"])
    return {k: torch.cat([t, t[-1:].expand(size - n, *t.shape[1:])]) for k, t in batch.items()}
