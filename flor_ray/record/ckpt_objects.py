"""Checkpoints that store each tensor once across a run's checkpoints.

A checkpoint of format 2 is a *skeleton*: the snapshot of :mod:`.checkpoint` with
every tensor of at least ``MIN_OBJECT_BYTES`` replaced by a reference to an object
of the run (``layout.checkpoint_object``), named by the sha256 of the tensor's
dtype, shape and bytes. An object already written for an earlier checkpoint of the
run is not written again, so a frozen backbone, its optimizer state, embeddings and
unchanged RNG states cost their bytes once per run, not once per checkpoint.

Objects are per run (not store-wide) so that deleting a run, or collecting its
checkpoints (:mod:`flor_ray.store.retention`), needs to read that run alone.

An object's file is ``MAGIC``, a codec byte, the header's length, the header (JSON:
dtype and shape) and the tensor's bytes, zlib-compressed (level 1) only when a
sample shows it pays: trained float weights barely compress (about 0.93), and
zlib's CPU on the writer competes with training, while zeros (fresh optimizer
buffers, masks) compress to almost nothing. Reading checks the bytes against the
object's name, so a damaged object surfaces as a :class:`CheckpointError` and the
checkpoint is routed around like a damaged full copy.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import CheckpointError
from ..store import layout

__all__ = ["FORMAT_OBJECTS", "MIN_OBJECT_BYTES", "CheckpointWriter", "encode", "decode", "join", "refs"]

FORMAT_OBJECTS = 2
MIN_OBJECT_BYTES = 4096  # smaller tensors stay inline: an object costs a file (a request on S3)
REF = "__flor_object__"
MAGIC = b"FLT1"
_RAW, _ZLIB = b"r", b"z"
SAMPLE = 1 << 16
PAYS = 0.85  # compress only if the sample shrinks to this fraction or less


@dataclass(frozen=True)
class Stored:
    """What writing one checkpoint cost: its skeleton and the objects it added."""

    skeleton: bytes
    new_objects: int
    new_bytes: int
    objects: int


def _tensor_bytes(t: Any) -> tuple[bytes, memoryview] | None:
    """(header, bytes) of a dense CPU tensor worth an object; None to keep it inline."""
    import torch

    if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu" or \
            t.numel() * t.element_size() < MIN_OBJECT_BYTES:
        return None
    flat = t.detach().contiguous().reshape(-1)
    header = json.dumps({"dtype": str(flat.dtype).replace("torch.", ""), "shape": list(t.shape)}).encode()
    return header, memoryview(flat.view(torch.uint8).numpy())


def _digest(header: bytes, raw: memoryview) -> str:
    h = hashlib.sha256(header)
    h.update(b"\n")
    h.update(raw)
    return h.hexdigest()


def encode(header: bytes, raw: memoryview) -> bytes:
    """An object's file: raw bytes, or zlib's when a sample says it pays."""
    codec, payload = _RAW, bytes(raw)
    sample = raw[:SAMPLE]
    if len(zlib.compress(sample, 1)) <= PAYS * len(sample):
        packed = zlib.compress(raw, 1)
        if len(packed) < len(payload):
            codec, payload = _ZLIB, packed
    return MAGIC + codec + struct.pack("<I", len(header)) + header + payload


def decode(data: bytes, digest: str, where: str) -> Any:
    """The tensor of an object's file, checked against its name ``digest``."""
    import torch

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint object {where} {why}; replay from an earlier checkpoint "
                               "(it is skipped automatically) or re-record", path=where)

    if len(data) < 9 or data[:4] != MAGIC or data[4:5] not in (_RAW, _ZLIB):
        raise bad("is not a flor_ray checkpoint object (truncated or corrupted)")
    (n,) = struct.unpack("<I", data[5:9])
    header, payload = data[9:9 + n], data[9 + n:]
    try:
        raw = zlib.decompress(payload) if data[4:5] == _ZLIB else payload
        meta = json.loads(header)
    except (zlib.error, ValueError) as exc:
        raise bad(f"is corrupted ({exc})") from exc
    if _digest(header, memoryview(raw)) != digest:
        raise bad("is corrupted (sha256 differs from its name)")
    dtype = getattr(torch, meta["dtype"])
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(meta["shape"])


def map_leaves(x: Any, is_leaf: Callable[[Any], bool], leaf: Callable[[Any], Any]) -> Any:
    """``x`` with each part that ``is_leaf`` selects replaced by ``leaf`` of it, its
    containers (dicts, their subclasses, lists, tuples) rebuilt around them."""
    if is_leaf(x):
        return leaf(x)
    if isinstance(x, dict):
        return {k: map_leaves(v, is_leaf, leaf) for k, v in x.items()} if type(x) is dict else \
            type(x)((k, map_leaves(v, is_leaf, leaf)) for k, v in x.items())
    if isinstance(x, list):
        return [map_leaves(v, is_leaf, leaf) for v in x]
    if isinstance(x, tuple):
        return tuple(map_leaves(v, is_leaf, leaf) for v in x)
    return x


def _walk(x: Any, leaf: Callable[[Any], Any]) -> Any:
    """``x`` with each tensor or reference replaced by ``leaf`` of it (containers rebuilt)."""
    torch = sys.modules.get("torch")
    return map_leaves(x, lambda v: (torch is not None and isinstance(v, torch.Tensor))
                      or (isinstance(v, dict) and REF in v), leaf)


def refs(skeleton: dict) -> set[str]:
    """The store paths of the objects a format-2 skeleton references."""
    out: set[str] = set()

    def leaf(x: Any) -> Any:
        if isinstance(x, dict):
            out.add(x[REF])
        return x

    _walk(skeleton, leaf)
    return out


def join(skeleton: dict, read: Callable[[str], bytes], where: str) -> dict:
    """The snapshot of a format-2 skeleton, each object read by ``read`` (path -> bytes)
    and checked; a missing one is a :class:`CheckpointError` naming it."""
    cache: dict[str, Any] = {}

    def leaf(x: Any) -> Any:
        if not isinstance(x, dict):
            return x
        rel = x[REF]
        if rel in cache:  # equal bytes, distinct tensors: an optimizer updates each in place
            return cache[rel].clone()
        try:
            data = read(rel)
        except FileNotFoundError as exc:
            raise CheckpointError(f"checkpoint object {rel} of {where} is missing", path=where) from exc
        cache[rel] = decode(data, rel.rsplit("/", 1)[-1], rel)
        return cache[rel]

    return _walk(skeleton, leaf)


class CheckpointWriter:
    """Writes one run's checkpoints (on its background writer, one at a time),
    remembering which objects the store already holds."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._stored: set[str] = set()

    def write(self, snap: dict, rel: str, put: Callable[[str, bytes], bool]) -> Stored | None:
        """Write the new objects of ``snap`` then its skeleton at ``rel`` with ``put``
        (path, bytes -> whether the store has it); None when a write did not land."""
        import io

        import torch

        new: dict[str, tuple[bytes, memoryview]] = {}
        count = 0

        def leaf(t: Any) -> Any:
            nonlocal count
            parts = _tensor_bytes(t)
            if parts is None:
                return t
            path = layout.checkpoint_object(self.run_id, _digest(*parts))
            count += 1
            if path not in self._stored:
                new[path] = parts
            return {REF: path}

        skeleton = _walk({**snap, "format": FORMAT_OBJECTS}, leaf)
        new_bytes = 0
        for path, parts in new.items():
            data = encode(*parts)
            if not put(path, data):
                return None
            self._stored.add(path)
            new_bytes += len(data)
        buf = io.BytesIO()
        torch.save(skeleton, buf)
        data = buf.getvalue()
        if not put(rel, data):
            return None
        return Stored(data, len(new), new_bytes, count)
