"""fpt: FPT+ transfer learning from a frozen large ViT through an offline Zarr feature store.

Stages (one folder each): ``fpt.extract`` (frozen LPM -> important-token K/V), ``fpt.store`` (the on-disk
format), ``fpt.train`` (side network + fine-grained prompts). ``fpt.cli`` wires them to the ``fpt`` command.
"""

__version__ = "0.1.0"


class FptError(Exception):
    """A problem with the user's input or environment, shown as one line without a traceback.

    The message is folded onto one line here, since parts of it often come from the user's data (a CSV header,
    a DICOM parser's complaint) and may hold line breaks."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def helper_process_died(error: BaseException) -> bool:
    """Whether ``error`` is torch's report that a DataLoader worker process died (killed, say by the kernel's
    out-of-memory killer), which it raises as a RuntimeError, wherever the main thread is, and says only in words."""
    return isinstance(error, RuntimeError) and "DataLoader worker" in str(error)


def failure_reason(e: BaseException) -> str:
    """Why reading a file failed, in words: ``EOFError`` alone for an empty or text file, and the first sentence
    of torch's zip reader (``PytorchStreamReader failed reading zip archive: failed finding central directory``)
    rather than its paragraph, cut off, for a truncated one."""
    first = (str(e).strip().splitlines() or [""])[0].split(". ")[0].strip().rstrip(".")
    if isinstance(e, EOFError) or not first:
        return f"{type(e).__name__}: the file ended early: empty, cut short, or not a saved model"
    return f"{type(e).__name__}: {first}"
