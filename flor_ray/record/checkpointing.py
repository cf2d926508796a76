"""The recording's checkpoints: the ``flor.checkpointing`` verb, the capture of an
outer iteration's state and its write on the background writer (a mixin of
:class:`flor_ray.record.session.RecordSession`, whose attributes it uses)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

from ..errors import CheckpointingError
from ..store import layout

__all__ = ["Checkpointing"]


class Checkpointing:
    """``flor.checkpointing`` and the checkpoints it takes."""

    @contextmanager
    def checkpointing(self, from_saves: bool = False, **objects: Any):
        """``from_saves=True``: take the script's own ``torch.save`` of the objects'
        state as the iteration's checkpoint where it holds what a replay needs
        (:mod:`.own_saves`)."""
        from .checkpoint import check_objects

        if not isinstance(from_saves, bool):
            raise CheckpointingError(
                f"flor.checkpointing(from_saves=...) takes True or False, not a {type(from_saves).__name__}; "
                "pass the objects to checkpoint under other names")
        if self._in_checkpointing:
            raise CheckpointingError(
                "flor.checkpointing is already active; use one `with flor.checkpointing(...)` "
                "around the outer loop, listing every object in it"
            )
        check_objects(objects)
        import torch  # noqa: F401  # on the training thread, before the writer serialises anything
        from .carried import install_loader_hook

        install_loader_hook()
        if not self.started:
            self.start()
        self._in_checkpointing = True
        self._checkpoint_objects = dict(objects)
        self.meta["checkpointing"] = sorted(objects)
        from .own_files import install_save_hook
        from .own_saves import SaveWatch

        self._save_watch = SaveWatch(objects, from_saves, self._submit_checkpoint)
        install_save_hook(lambda: self._save_watch, lambda: self._file_facts)
        try:
            yield self
        finally:
            self._in_checkpointing = False
            self._checkpoint_objects = None
            self._save_watch = None

    def _capture(self, i: int) -> None:
        from .checkpoint import capture

        t0 = time.perf_counter()
        if self._print_iter and self._iter_inner_exits:  # the script's save completes it (own_saves)
            self._save_watch.arm(i, self._iter_inner_exits, self._scope_frame)
        else:
            self._pending_snap = capture(self._checkpoint_objects or {}, i, self._iter_inner_exits,
                                         self._scope_frame)
        self._pending_cost += time.perf_counter() - t0

    def _submit_checkpoint(self, snap: dict | None) -> None:
        if snap is None:
            return
        from .checkpoint import manifest_entry
        from .ckpt_objects import CheckpointWriter

        rel = layout.checkpoint(self.run_id, snap["iteration"])
        # one per run: it remembers the tensors (objects) earlier checkpoints stored
        ckw = self.__dict__.setdefault("_ckpt_writer", CheckpointWriter(self.run_id))

        def write(snap=snap, rel=rel):
            cpu = time.thread_time()
            stored = ckw.write(snap, rel, lambda path, data: self._spool.write(path, data, durable=True, spill=False))
            if stored is None:
                return  # skipped, listed in the run's "lost": replays start from an earlier one
            entry = manifest_entry(snap, rel, stored.skeleton, stored)  # outside the lock: _write_meta takes it
            with self._lock:
                self._manifest.append(entry)
            self._write_cpu_s = time.thread_time() - cpu  # CPU only: waiting for fsync costs training nothing

        self.writer.submit(write)
