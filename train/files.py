"""Run-directory files: atomic writes (one helper for checkpoints, metrics.json, sweep.json, sweep.csv), the
versioned checkpoint format, and a background writer so that saving a checkpoint does not stall training.

A checkpoint is a ``torch.save``d dict ``{"fpt_checkpoint": FORMAT_VERSION, "kind": "best" | "last", ...}``:

* ``best``: ``model`` (state dict), ``spec`` (ModelSpec dict), ``store`` (store identity), ``config``, ``epoch``
  — what evaluate/predict/show need to rebuild the model;
* ``last``: the above plus ``optimizer``, ``schedule``, ``rng``, ``history``, ``best``, ``samples``, ``seconds``
  — what ``fpt train --resume`` needs to continue.

A checkpoint of another format version is refused with a clear message (no guessing from its keys).
"""
from __future__ import annotations

import functools
import io
import os
import pickle
import queue
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from fpt import FptError, failure_reason

FORMAT_VERSION = 1
KINDS = ("best", "last")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a uniquely named temporary file next to ``path``, then rename it over ``path``: a reader
    (or a kill at any moment) sees the old file or the new one, never a torn one. The temporary file is removed
    when ``write`` fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())            # as a plainly created file (mkstemp's are the owner's only)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@functools.cache
def _umask() -> int:
    """This process's umask, read where it does not change it (``os.umask`` sets it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_checkpoint(path: Path, kind: str, content: dict[str, Any]) -> None:
    """Write a checkpoint of ``kind`` (best or last) atomically, stamped with the format version."""
    assert kind in KINDS, kind
    # serialised in memory first (a side network's few MB): a full disk is then an OSError of the file's write,
    # not torch's zip writer failing mid-file with "unexpected pos"
    buffer = io.BytesIO()
    torch.save({"fpt_checkpoint": FORMAT_VERSION, "kind": kind, **content}, buffer)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


def read_checkpoint(path: Path, kind: str, what: str = "--checkpoint") -> dict[str, Any]:
    """A checkpoint's dict (on the CPU), refused unless it is an fpt checkpoint of this format version; ``kind``
    "best" also accepts a last.pt (it holds the model too). ``what`` names the option in error messages."""
    try:
        with warnings.catch_warnings():     # a foreign pickle's protocol warning would precede the one-line refusal
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            content = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FptError(f"{what} {path}: no such file") from None
    except pickle.UnpicklingError:      # torch's own text is a page long and suggests an unsafe load
        raise FptError(f"{what} {path} is not an fpt checkpoint (not a file torch.save wrote, or one holding "
                       "objects a safe, weights-only load refuses)") from None
    except Exception as e:
        raise FptError(f"{what} {path} is not an fpt checkpoint ({failure_reason(e)})") from None
    if not isinstance(content, dict) or "fpt_checkpoint" not in content:
        raise FptError(f"{what} {path} is not an fpt checkpoint of a known format (no format version; "
                       "checkpoints written before format 1 cannot be read: train again)")
    version = content["fpt_checkpoint"]
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise FptError(f"{what} {path} has checkpoint format {version}, this fpt reads format {FORMAT_VERSION}: "
                       + ("upgrade fpt to read it" if newer else "train again with this fpt"))
    if kind == "last" and content.get("kind") != "last":
        raise FptError(f"{what} {path} is a {content.get('kind')} checkpoint, not an unfinished run's last.pt")
    return content


def copy_tensors(obj: Any, device: torch.device | str | None = None) -> Any:
    """A copy of ``obj`` (nested dicts/lists of tensors and plain values) with every tensor detached and copied
    to ``device`` (default: where it is; a copy on a GPU does not wait for the GPU)."""
    return _with_tensors(obj, (t.detach().to(t.device if device is None else device, copy=True)
                               for t in _tensors(obj)))


class TensorCopies:
    """``refresh(obj)``: what ``copy_tensors(obj)`` gives (the same nesting, each tensor copied where it is), into
    the same copies at every call while ``obj``'s tensors keep their shapes, dtypes and devices, refreshed by one
    fused copy (``torch._foreach_copy_``) instead of one dispatch per tensor. After each epoch a run copies its
    model and optimizer state, ~340 tensors at the paper's setting: one by one, that held the interpreter lock
    ~10 ms per epoch per run on a GPU (lease 5), which the runs of a sweep in threads share. A refresh overwrites
    what the previous one returned."""

    def __init__(self):
        self.copies: list[torch.Tensor] = []
        self.kinds: list[tuple] = []        # the copies' (shape, dtype, device)

    @torch.no_grad()
    def refresh(self, obj: Any) -> Any:
        sources = _tensors(obj)
        kinds = [(t.shape, t.dtype, t.device) for t in sources]
        if kinds != self.kinds:
            self.copies, self.kinds = [t.detach().clone() for t in sources], kinds
        elif sources:
            torch._foreach_copy_(self.copies, sources)
        return _with_tensors(obj, iter(self.copies))


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors of ``obj`` (nested dicts/lists/tuples), in the order ``_with_tensors`` puts them back."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _with_tensors(obj: Any, tensors: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return next(tensors)
    if isinstance(obj, dict):
        return {k: _with_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_with_tensors(v, tensors) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints in a background thread: ``submit`` copies the state to the CPU (the only wait for the
    device) and returns; the file is written (atomically) while training goes on. A failed write is raised by
    the next ``submit``, ``flush`` or the end of the ``with`` block, and nothing is written after it; leaving the
    block waits for pending writes (also when training stopped with an exception, so that last.pt is whole).

    ``save`` is the function that writes one file (``save_checkpoint``; replaceable in tests)."""

    def __init__(self, save: Callable[[Path, str, dict], None] | None = None):
        self.save = save
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None      # the first failed write; nothing is written after it
        self._reported = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="fpt-checkpoint-writer")
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._error is None:
                    (self.save or save_checkpoint)(*item)
            except BaseException as e:      # noqa: BLE001 - re-raised in the training thread
                self._error = e
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    def submit(self, path: Path, kind: str, content: dict[str, Any]) -> None:
        self._raise()
        self._queue.put((path, kind, copy_tensors(content, "cpu")))

    def flush(self) -> None:
        """Wait until every submitted checkpoint is written; raise a write's failure."""
        self._queue.join()
        self._raise()

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self._queue.put(None)
        self._thread.join()             # pending writes finish even when training stopped (Ctrl-C): resumable
        if exc_type is None:
            self._raise()
