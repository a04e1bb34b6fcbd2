"""Ranks 1..N-1 of a distributed trunk (distributed.py): they serve rank 0's commands and never
see the network.

Rank 0 sends each command over the ranks' gloo group (rank_wire.py) and waits for one reply
per command: ``{}``, the command's results, or ``{"error": message, "kind": name}``, which rank 0
turns into the call's error: the library's refusals keep their class (``kind``), anything else
the trunk raised is a TrunkError there, as it is on rank 0. The commands::

    forward / backward   this rank's share of a Compute or Backward (DistributedRunner)
    idle                 ddp: no share of this forward (a batch smaller than the world)
    alive                nothing: rank 0 had no call for a while (each rank waits for the
                         next command at most --dist-timeout seconds)
    idle_backward        ddp: no share of this backward, but a voice in whether it failed
    mirror               run engine operation ``name`` on this rank's copy of a session
    stop                 leave (the server stopped)

Every command also carries what rank 0 dropped since the last one: the forwards whose graphs
to free, and the sessions to forget.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from . import throttle
from .calls import GradNormCall, StepCall
from .errors import InvalidRequest, RemoteAutogradError
from .sessions import ZeroGrad
from .tree import flatten
from .validate import autocast_dtype

if TYPE_CHECKING:
    from .distributed import DistributedRunner

__all__ = ["Follower"]

log = logging.getLogger(__name__)


class Follower:
    """Serves rank 0's commands with this rank's runner and engine until told to stop."""

    def __init__(self, runner: DistributedRunner) -> None:
        self.runner = runner
        # The parameter gradients of this rank's last Backward share, kept until rank 0's
        # engine accounts them (the "account" mirror that follows every Backward).
        self.last_param_grads: list[torch.Tensor | None] = []

    def serve(self) -> None:
        """Until rank 0 says stop (or the group breaks)."""
        runner = self.runner
        while True:
            try:
                command = runner.wire.recv(0)
            except RuntimeError as exc:  # rank 0 is gone: torchrun stops the group
                log.error("rank %d: rank 0 is gone (%s); leaving", runner.rank, exc)
                raise SystemExit(1) from exc
            op = command["op"]
            if op == "stop":
                return
            runner.free(command["free"])
            for key in command["forget"]:
                runner.engine.sessions.drop(key)
            reply: dict[str, Any] = {}
            try:
                if op == "forward":
                    reply = self._forward(command)
                elif op == "backward":
                    reply = self._backward(command)
                elif op in ("idle", "alive"):  # ddp: no share of this forward; rank 0 idle
                    pass
                elif op == "idle_backward":  # ddp: this rank's share was empty
                    runner.failed_somewhere(False)
                    self.last_param_grads = [None] * len(runner.params)
                elif op == "mirror":
                    self._mirror(command)
                else:
                    raise InvalidRequest(f"unknown command {op!r}")
            except Exception as exc:  # noqa: BLE001 - reported to rank 0, which answers the call
                if not isinstance(exc, RemoteAutogradError):  # the trunk's own failure
                    throttle.log_trunk_failure(log, f"rank {runner.rank}: {op}", exc)
                reply = {"error": f"{type(exc).__name__}: {exc}", "kind": type(exc).__name__}
            runner.wire.send(reply, 0)

    def _forward(self, command: dict[str, Any]) -> dict[str, Any]:
        runner = self.runner
        template, tensors = flatten(command["value"])
        leaves = [
            runner.share_leaf(t, need) for t, need in zip(tensors, command["needs"], strict=True)
        ]
        _, outputs = runner.forward_share(
            template,
            leaves,
            command["training"],
            command["seed"],
            command["grad"],
            command["token"],
            autocast_dtype(command["autocast"] or ""),
            command["recompute"],
        )
        return {"outputs": [o.detach() for o in outputs]}

    def _backward(self, command: dict[str, Any]) -> dict[str, Any]:
        result = None
        error = None
        try:
            result = self.runner.backward_share(
                command["token"],
                command["grads"],
                command["wanted"],
                command["retain"],
                command["parameters"],
                command["zeros_for"],
                command.get("training"),
            )
        except Exception as exc:  # noqa: BLE001 - every rank learns of it in the vote
            error = exc
        self.runner.failed_somewhere(error is not None)
        if error is not None:
            raise error
        assert result is not None
        self.last_param_grads = result[1]
        return {"grads": result[0]}

    def _mirror(self, command: dict[str, Any]) -> None:
        engine, name, args, key = (
            self.runner.engine,
            command["name"],
            command["args"],
            command["key"],
        )
        existed = key in engine.sessions
        session: Any = engine.sessions.get(key) if key else None
        try:
            # A Step needs the optimizer this rank was given (ConfigureOptimizer or a checkpoint).
            self.runner.agree_on_session(name, key, name != "step" or session.optimizer is not None)
        except InvalidRequest:
            if key and not existed:  # made just now for a session rank 0 no longer holds
                engine.sessions.drop(key)
            raise
        if name == "account":
            grads, self.last_param_grads = self.last_param_grads, []
            engine.account(session, grads, **args)
        elif name == "grad_norms":
            engine.norms(session, GradNormCall(**args))
        elif name == "configure":
            engine.configure_optimizer(session, **args)
        elif name == "step":
            call = StepCall(
                step=args["step"],
                zero_grad=ZeroGrad(args["zero_grad"]),
                grad_scale=args["grad_scale"],
            )
            engine.apply_step(session, session.optimizer, call, args["groups"])
        elif name == "load_state":
            engine.load_state(session, args["state"])
        elif name == "get_state":
            engine.get_state(session, **args)
        elif name == "checkpoint":
            engine.write_checkpoint(args["on_error"])
        else:
            raise InvalidRequest(f"unknown engine operation {name!r}")
