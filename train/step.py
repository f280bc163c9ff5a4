"""The training step, one for every caller (``fpt train``, the memory measurement, the benches): augmentation,
forward, cross-entropy, backward, gradient-norm clip, AdamW, cosine schedule; and the evaluation forward.

On CUDA the forward (augmentation included) and its backward are compiled with ``torch.compile`` in
``reduce-overhead`` mode (CUDA graphs: one replay instead of hundreds of kernel launches); the optimizer is
AdamW's fused kernel. Shapes are static — training batches are full (the last partial batch is dropped) and
evaluation batches are padded to the batch size — so nothing recompiles between epochs. Elsewhere the step runs
eagerly (compiling on the CPU is possible, in torch.compile's default mode). When compilation fails the step
says so in one warning and runs eagerly.
"""
from __future__ import annotations

import warnings
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from fpt.train.data import Batch, SideInput
from fpt.train.model import LinearProbe, SideNetwork

CLIP_NORM = 1.0


def compile_default(device: torch.device) -> bool:
    """Compile the step by default on CUDA only (on the CPU, compiling takes longer than it saves)."""
    return device.type == "cuda"


def step_compiles(compile: bool | None, device: torch.device) -> bool:
    """Whether a run's step is compiled: ``compile`` as given (``--compile`` / ``--no-compile``), else by default."""
    return compile_default(device) if compile is None else compile


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, total_steps: int,
                   device: torch.device) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.CosineAnnealingLR]:
    """AdamW (its fused kernel on CUDA) and the cosine schedule over ``total_steps`` steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                  **({"fused": True} if device.type == "cuda" else {}))
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))


class CompiledOrEager:
    """``fn`` compiled with ``torch.compile`` (static shapes) on first use, or ``fn`` itself when ``compile`` is
    off or compiling fails (then one warning names the reason and the rest of the run is eager)."""

    def __init__(self, fn: Callable, compile: bool, mode: str | None, what: str):
        self.eager, self.what, self.compiled = fn, what, None
        if compile:
            try:
                self.compiled = torch.compile(fn, mode=mode, dynamic=False)
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
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"torch.compile of the {self.what} failed ({type(error).__name__}: {reason}); "
                      "running it eagerly (--no-compile skips the attempt)", RuntimeWarning, stacklevel=3)
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


def pad_batch(batch: Batch, size: int) -> Batch:
    """A batch of n < ``size`` samples padded to ``size`` by repeating its last sample (the padded rows' outputs
    are dropped): evaluation keeps one static shape."""
    n = len(batch["labels"])
    return {k: torch.cat([t, t[-1:].expand(size - n, *t.shape[1:])]) for k, t in batch.items()}


class TrainStep:
    """``step(batch, draws) -> loss``: one optimisation step of ``model`` on a batch of store arrays (on the
    training device), with the side network's augmentation from ``draws`` [DRAWS, B] (``SideInput.draw``).
    Returns the loss as a detached device tensor (no host sync). ``step.probabilities(batch)`` is the
    evaluation forward (softmax [B, C]).

    ``compile``: compile forward+backward (and the evaluation forward); ``mode``: torch.compile's mode (default:
    ``reduce-overhead`` on CUDA, torch.compile's default elsewhere)."""

    def __init__(self, model: SideNetwork | LinearProbe, side_input: SideInput, optimizer: torch.optim.Optimizer,
                 schedule: torch.optim.lr_scheduler.LRScheduler | None = None, compile: bool = False,
                 mode: str | None = None, clip_norm: float = CLIP_NORM):
        self.model, self.side_input, self.optimizer, self.schedule = model, side_input, optimizer, schedule
        self.clip_norm = clip_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        device = next(model.parameters()).device
        side_input.to(device)
        if mode is None and device.type == "cuda":
            mode = "reduce-overhead"
        self.cuda_graphs = compile and mode == "reduce-overhead"
        self._loss = CompiledOrEager(self.loss, compile, mode, "training step")
        self._proven = False                # a whole step (forward and backward) ran
        self._probabilities = CompiledOrEager(self.eval_probabilities, compile, mode, "evaluation forward")

    @property
    def is_compiled(self) -> bool:
        return self._loss.is_compiled

    def loss(self, batch: Batch, draws: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the model on the augmented batch (what is compiled)."""
        logits = self.model.forward_batch(batch, partial(self.side_input, train=True, draws=draws))
        return F.cross_entropy(logits, batch["labels"])

    def eval_probabilities(self, batch: Batch) -> torch.Tensor:
        return self.model.forward_batch(batch, partial(self.side_input, train=False)).float().softmax(-1)

    def _forward_backward(self, batch: Batch, draws: torch.Tensor) -> torch.Tensor:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = self._loss(batch, draws)
        loss.backward()
        return loss

    def __call__(self, batch: Batch, draws: torch.Tensor) -> torch.Tensor:
        if self._proven or not self._loss.is_compiled:
            loss = self._forward_backward(batch, draws)
        else:       # the backward compiles on its first call: a failure there falls back to eager too
            try:
                loss = self._forward_backward(batch, draws)
            except Exception as e:          # noqa: BLE001
                self._loss.fall_back(e)
                self.cuda_graphs = False
                loss = self._forward_backward(batch, draws)
            self._proven = True
        torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.optimizer.step()
        # released right after the update, not at the next step: with CUDA graphs the gradients are outputs of
        # the backward's replay, and none then stays alive into the next replay or into evaluation
        self.optimizer.zero_grad(set_to_none=True)
        if self.schedule is not None:
            self.schedule.step()
        return loss.detach().clone()        # a CUDA graph's output is overwritten by its next replay

    @torch.no_grad()
    def probabilities(self, batch: Batch, batch_size: int | None = None) -> torch.Tensor:
        """Class probabilities [n, C] of a batch of n samples; with ``batch_size`` the batch is padded to that
        size first (one static shape for the compiled forward)."""
        n = len(batch["labels"])
        if batch_size is not None and n < batch_size:
            batch = pad_batch(batch, batch_size)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self._probabilities(batch)[:n].clone()
