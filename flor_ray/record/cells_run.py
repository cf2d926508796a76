"""The part of a recording that follows a notebook's cells (see :mod:`.notebook`):
a mixin of :class:`~.session.RecordSession`, kept apart from its loops and flushes."""

from __future__ import annotations

from typing import Any

__all__ = ["CellsRun"]


class CellsRun:
    """A run's code as the kernel's executed cells, and its end where a block begins.

    ``block`` says which part of its process a run is when ``with flor.run():`` blocks
    cut the process into several runs: ``{"block": k}`` (the k-th block entered) or
    ``{"after_blocks": b}`` (the flor calls outside blocks, after b of them); None: the
    whole process. A replay runs the process's code and keeps only that part's rows
    (:mod:`flor_ray.execution.blocks`).

    Uses the session's ``meta``, ``snapshot``, ``store``, ``writer``, ``script``,
    ``settings``, ``run_id``, ``block``, ``kwargs`` and ``_cells`` (None outside a kernel)."""

    _cells: Any
    block: Any

    def _locate(self):
        """The recorded script in its repository; in IPython / Jupyter, the cells' file."""
        from . import notebook
        from . import start as st

        shell = notebook.kernel_shell()
        if shell is None:
            return st.locate_script(self.argv)
        place = notebook.locate(shell)
        # a kernel-session run follows the cells it goes on running; a block's code is its cell and those before
        self._cells = notebook.CellsRecorder(shell, place, follow=not (self.block or {}).get("block"))
        return st.ScriptInRepo(place.repo_root, place.script)

    def _note_parts(self, cells) -> None:
        """The first metadata of a run of cells, or of a block: what a replay must run of its process."""
        if cells is not None:
            self.meta["argv"] = []  # the kernel's own (-f kernel.json), not the cells'
            self._note_cells(cells)
            self._cells.on_cell_end = self._after_cell
        if self.block is not None:
            self.meta["block"] = {**self.block, "kwargs": dict(self.kwargs)}

    def _note_cells(self, cells) -> None:
        """The cells' part of the metadata: which ran, the notebook, why a replay must refuse them."""
        self.meta["notebook"] = {"path": self._cells.place.notebook, "cells": list(cells.cells),
                                 "kernel_session": self._cells.follow}
        if cells.refusal:
            self.meta["replay_refused"] = cells.refusal
        else:
            self.meta.pop("replay_refused", None)

    def _refresh_cells(self) -> bool:
        """A kernel-session run's code once the kernel has run more cells: the snapshot
        again, with them (the same ref, moved); whether it changed."""
        cells = self._cells
        if cells is None or not cells.follow or self._finished or not cells.grew():
            return False
        from ..versions import upload
        from . import start as st

        script = cells.script()
        where = st.ScriptInRepo(cells.place.repo_root, self.script)
        snap = st.take_snapshot(self.settings, self.store, where, self.run_id, extra={self.script: script.text},
                                replace=self.snapshot.commit)
        self.snapshot, self.version = snap, snap.tree
        self.meta.update({"version": snap.tree, "commit": snap.commit})
        self._note_cells(script)
        self.writer.submit(upload, self.store, snap)
        return True

    def _after_cell(self) -> None:
        """After each cell of the kernel: its rows and its code are in the store before the
        kernel idles (a crash while it waits loses nothing)."""
        if self.started and not self._finished:
            self._flush()
            # the code upload (git cat-file children) done before the kernel idles: a
            # shutdown request makes ipykernel terminate the kernel's child processes
            self.writer.drain()

    def _end_cells(self) -> None:
        """At the run's end: the cells run since the last flush, then no more following them."""
        if self._cells is not None:
            self._refresh_cells()
            self._cells.close()

    def end_by_block(self) -> None:
        """End this run where a ``with flor.run():`` block begins (the block is a run of its own)."""
        if self.block is None:
            self.block = {"after_blocks": 0}
        if self.started:
            self.meta["block"] = {**self.block, "kwargs": dict(self.kwargs)}
        self.finish()
