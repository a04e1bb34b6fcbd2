"""Trunk checkpoints on the server's disk: weights, every session's optimizer, step numbers.

A checkpoint is one codec frame (``codec.encode``; msgpack, no pickle) holding::

    {"format": 1, "weights_version": int, "module": {name: tensor},
     "sessions": {key: {"step": int, "optimizer": name, "options": {plain kwargs},
                        "state": optimizer.state_dict()}}}

It is written to a temporary file in the same directory, flushed to disk, then renamed over the
old one, so a server killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Any

import torch

from . import codec
from .options import Limits
from .state import TrunkState

__all__ = ["CheckpointMixin", "load_checkpoint", "save_checkpoint"]

log = logging.getLogger(__name__)

FORMAT = 1
# The server reads only files it wrote itself, but a checkpoint is as large as the trunk and its
# optimizer state, far beyond the limits of one network call.
_FILE_LIMITS = Limits(
    max_payload_bytes=1 << 62,
    max_tensor_bytes=1 << 62,
    max_tensor_elements=1 << 62,
    max_tensors=1 << 31,
    max_header_bytes=1 << 31,
)


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename, fsync the dir)."""
    buffers = codec.Encoder(compression="none").encode_buffers({"format": FORMAT, **state})
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", dir=directory)
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


def load_checkpoint(path: str) -> dict[str, Any] | None:
    """The state saved at ``path``, or None when there is no checkpoint yet."""
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
    except FileNotFoundError:
        return None
    state = codec.Decoder(limits=_FILE_LIMITS).decode(data)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a remote_autograd checkpoint of format {FORMAT}; move it away or "
            "point --checkpoint elsewhere"
        )
    return state


class CheckpointMixin(TrunkState):
    """Saving and restoring the whole server state; a mixin of TrunkService."""

    def checkpoint(self, *, on_error: str = "raise") -> int:
        """Save the trunk and every session's optimizer to ``checkpoint_path``; return the
        weights version saved. A consistent snapshot: no Step runs while it is written."""
        path = self.options.checkpoint_path
        if not path:
            raise ValueError("ServerOptions.checkpoint_path is not set")
        with self._trunk_lock:
            version = self.weights_version
            sessions = {}
            for session in self.sessions.values():
                if session.optimizer is not None:
                    sessions[session.key] = {
                        "step": session.last_step,
                        "optimizer": session.optimizer_name,
                        "options": session.optimizer_options,
                        "state": session.optimizer.state_dict(),
                    }
            state = {
                "weights_version": version,
                "module": dict(self.module.state_dict()),
                "sessions": sessions,
            }
            try:
                save_checkpoint(path, state)
            except OSError:
                if on_error == "raise":
                    raise
                log.exception("could not save the checkpoint to %s; training goes on", path)
                return self.saved_version or 0
            self.saved_version = version
        log.debug("checkpoint of weights v%d saved to %s", version, path)
        return version

    def _restore(self, path: str) -> None:
        state = load_checkpoint(path)
        if state is None:
            log.info("no checkpoint at %s yet: starting from the module's weights", path)
            return
        with torch.no_grad():
            self.module.load_state_dict(state["module"])
        self.weights_version = self.saved_version = int(state["weights_version"])
        for key, saved in state["sessions"].items():
            session = self.sessions.get(key)
            cls = getattr(torch.optim, saved["optimizer"])
            session.optimizer = cls([p for _, p in self.params], **saved["options"])
            session.optimizer.load_state_dict(saved["state"])
            session.optimizer_name = saved["optimizer"]
            session.optimizer_options = saved["options"]
            session.last_step = int(saved["step"])
        log.info(
            "resumed from checkpoint %s: weights v%d, %d sessions",
            path,
            self.weights_version,
            len(state["sessions"]),
        )
