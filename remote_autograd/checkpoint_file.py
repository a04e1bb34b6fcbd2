"""Trunk checkpoints on the server's disk: weights, every session's optimizer, step numbers.

A checkpoint is one codec frame (``codec.encode``; msgpack, no pickle) holding::

    {"format": 1, "weights_version": int, "module": {name: tensor},
     "sessions": {key: {"step": int, "optimizer": name, "options": {plain kwargs},
                        "groups": [{"params": [names], kwargs}] or None,
                        "state": optimizer.state_dict()}}}

It is written to a temporary file in the same directory, flushed to disk, then renamed over the
old one, so a server killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from . import codec
from .options import Limits

__all__ = ["FILE_LIMITS", "FORMAT", "load_checkpoint", "save_checkpoint", "write_atomically"]

FORMAT = 1
# The server reads only files it wrote itself, but a checkpoint is as large as the trunk and its
# optimizer state, far beyond the limits of one network call.
FILE_LIMITS = Limits(
    max_payload_bytes=1 << 62,
    max_tensor_bytes=1 << 62,
    max_tensor_elements=1 << 62,
    max_tensors=1 << 31,
    max_header_bytes=1 << 31,
    max_decoded_bytes=1 << 62,
    # What a call may nest (Limits.max_depth), inside the checkpoint's own maps (sessions,
    # adapters, optimizer states): a file the server wrote must be one it can read back.
    max_depth=Limits().max_depth + 32,
)


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename, fsync the dir)."""
    write_atomically(
        path, codec.Encoder(compression="none").encode_buffers({"format": FORMAT, **state})
    )


def write_atomically(path: str, buffers: Sequence[bytes | memoryview]) -> None:
    """Write ``buffers`` to ``path`` so that a crash leaves the old file or the new one whole:
    a temporary file in the same directory, flushed to disk, renamed over it, the directory
    flushed too."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for buffer in buffers:
                f.write(buffer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _temporary_prefix(path: str) -> str:
    return f".{os.path.basename(path)}.tmp-"


def remove_temporaries(path: str) -> int:
    """Remove what writes of ``path`` killed mid-way left (a server starting: none of its
    own is under way); returns how many."""
    directory, prefix = os.path.dirname(os.path.abspath(path)), _temporary_prefix(path)
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(directory):
            if name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))
                    removed += 1
    return removed


def load_checkpoint(path: str) -> dict[str, Any] | None:
    """The state saved at ``path``, or None when there is no checkpoint yet."""
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
    except FileNotFoundError:
        return None
    state = codec.Decoder(limits=FILE_LIMITS).decode(data)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a remote_autograd checkpoint of format {FORMAT}; move it away or "
            "point --checkpoint elsewhere"
        )
    return state
