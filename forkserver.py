"""Helper processes forked from a fork server instead of spawned (``fork_server_context``).

A spawned process starts a new interpreter and runs the program's main module again: for ``python -m
fpt.bench.gpu``, the ``fpt`` script or a user's script that imports torch, up to ~2 s of CPU in each. A fork server
is one clean process, started once per program (no CUDA, no threads, so safe to fork), that imports what the
helpers need and runs the main module once; each helper is then a fork of it, and finds the main module in place.

``multiprocessing`` alone does not get there: CPython 3.11 and 3.12 never hand a script's path to their fork
server (``"__main__"`` among the preloaded modules does nothing; fixed in later versions, gh-126631), and a module
run with ``-m`` is only imported there, so every child runs it again as its ``__mp_main__``. So this module,
preloaded by the server, runs the main module there as a spawned child would (``MAIN_ENV`` names it, set only
while the server starts).

Imports nothing heavy: the server imports it.
"""
from __future__ import annotations

import multiprocessing
import os
import runpy
import sys
import types
from contextlib import contextmanager
from multiprocessing import spawn
from typing import Iterator

MAIN_ENV = "FPT_FORK_SERVER_MAIN"       # "path:<script>" or "name:<module>": the program's main module


def fork_server_context(preload: list[str]) -> multiprocessing.context.BaseContext:
    """The ``multiprocessing`` context for helper processes: the fork server with the modules ``preload`` and
    the program's main module (``starting``), or spawn where there is no fork server (Windows). The program has
    one fork server: the preload list applies when it starts (the first helper started in any ``starting``
    block), and a server already running is reused as it is."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*preload, __name__])
    return context


@contextmanager
def starting() -> Iterator[None]:
    """Start the helper processes of a ``fork_server_context`` inside this block: if the server starts here, it
    runs the main module the way each of its children will be told to find it."""
    main = main_module()
    if main is None or MAIN_ENV in os.environ:
        yield
        return
    os.environ[MAIN_ENV] = main
    try:
        yield
    finally:
        os.environ.pop(MAIN_ENV, None)


def main_module() -> str | None:
    """The main module as a spawned child is told to find it: ``name:<module>`` for ``python -m module`` (None
    for a package's ``__main__``, which a child skips), ``path:<script>`` for a script, None when interactive."""
    data = spawn.get_preparation_data("fpt")
    name = data.get("init_main_from_name")
    if name is not None:
        return None if name == "__main__" or name.endswith(".__main__") else f"name:{name}"
    path = data.get("init_main_from_path")
    return None if path is None else f"path:{path}"


def _run_main(main: str) -> None:
    """In the fork server: the main module as ``multiprocessing.spawn`` runs it in a child (``__mp_main__``,
    guarded code not run), so that the server's children find it already there."""
    kind, _, where = main.partition(":")
    if kind == "path":
        spawn.import_main_path(where)
    else:
        module = types.ModuleType("__mp_main__")
        module.__dict__.update(runpy.run_module(where, run_name="__mp_main__", alter_sys=True))
        sys.modules["__main__"] = sys.modules["__mp_main__"] = module


if os.environ.get(MAIN_ENV) and multiprocessing.parent_process() is None and "__main__" in sys.modules \
        and getattr(sys.modules["__main__"], "__spec__", None) is None and not hasattr(sys.modules["__main__"],
                                                                                      "__file__"):
    _run_main(os.environ[MAIN_ENV])         # in the fork server, as it starts (see the module's docstring)
