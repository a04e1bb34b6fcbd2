"""A trunk on several processes under ``torchrun``: one front door, every rank computing.

Rank 0 runs the usual gRPC server (service.py) around the usual engine (engine.py); only its
runner differs. :class:`DistributedRunner` hands every forward and backward to every rank
through torch.distributed, each rank processing its share of the batch, and gathers outputs
and input gradients back in order. Ranks other than 0 run :meth:`DistributedRunner.follow`:
they never see the network, only commands from rank 0.

What rank 0 keeps, as for one process: sessions, per-session gradients, forward contexts,
exactly-once Backward and Step, recompute, limits, authentication, the optimizers and the
checkpoints. What every rank keeps: a replica of the trunk (``ddp``) and the autograd graph of
its share of each kept forward, freed when rank 0's context goes away.

- **The batch.** The batch size is the first dimension of the first input tensor that has one;
  every input tensor whose first dimension equals it is split into contiguous shares (uneven
  when the batch does not divide by the ranks; a rank whose share is empty sits the call out).
  Other tensors (position ids of batch 1, masks without a batch dimension) and plain values go
  to every rank whole. Every tensor output must carry the batch as its first dimension when
  more than one rank ran: the shares are concatenated back in rank order.
- **Gradients.** Each Backward sums the ranks' parameter gradients onto rank 0 (one
  ``reduce`` of one flat buffer): the loss is the client's, so the sum over the shares is the
  unsplit gradient. Rank 0's engine accumulates them in the session as usual, so deferred
  ``zero_grad``, clipping (GradNorm) and Step need no collective at all.
- **Weights.** Rank 0's session optimizer steps its replica; before the next command rank 0
  broadcasts the trainable parameters (detected by their version counters), so every replica
  runs the next forward on the same weights. A LoadState or a restored checkpoint travels the
  same way; at start rank 0 broadcasts its whole ``state_dict``.
- **Wire between ranks.** Commands and replies are codec frames (codec.py: msgpack and raw
  tensor bytes, never pickle) sent point to point over a gloo group; parameter gradients and
  weights use the default group (NCCL on GPUs, gloo on CPUs).
- **Dropout.** Rank ``r`` seeds its share's forward with ``seed + r``: a recompute on the same
  rank draws the same masks; the masks differ from an unsplit run's.
- **Failures.** A rank that dies makes the next collective fail on rank 0, which answers that
  call and every later one with UNAVAILABLE (:class:`~remote_autograd.errors.ServerUnavailable`);
  torchrun then stops the group. Restart it with the same ``--checkpoint`` to continue.
"""

from __future__ import annotations

import collections
import datetime
import logging
import os
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .codec import Decoder, Encoder
from .errors import InvalidRequest, ServerUnavailable
from .options import Limits, ServerOptions
from .runner import TrunkRunner
from .tree import flatten, unflatten
from .validate import autocast_dtype

__all__ = ["PARALLEL_MODES", "DistributedRunner", "serve_distributed", "shares"]

log = logging.getLogger(__name__)

PARALLEL_MODES = ("ddp",)
DEFAULT_TIMEOUT = 600.0  # seconds a collective may wait (serve --dist-timeout)

# Frames between our own ranks: trusted, so only generous sanity limits.
_INTERNAL_LIMITS = Limits(
    max_payload_bytes=1 << 40,
    max_tensor_bytes=1 << 40,
    max_tensor_elements=1 << 40,
    max_tensors=1 << 20,
    max_header_bytes=1 << 30,
)


def shares(batch: int, world: int) -> list[int]:
    """Contiguous share sizes of a batch over ``world`` ranks, the first ranks one larger."""
    base, extra = divmod(batch, world)
    return [base + (1 if rank < extra else 0) for rank in range(world)]


def _batch_size(tensors: Sequence[torch.Tensor]) -> int | None:
    return next((int(t.shape[0]) for t in tensors if t.dim() >= 1), None)


class _Plan:
    """How one call's inputs are split: per input batched or whole, the share sizes, the ranks
    that run."""

    def __init__(self, tensors: Sequence[torch.Tensor], world: int) -> None:
        batch = _batch_size(tensors)
        self.batched = [batch is not None and t.dim() >= 1 and t.shape[0] == batch for t in tensors]
        # No batch dimension at all: rank 0 runs the call whole.
        self.sizes = shares(batch, world) if batch is not None else [1] + [0] * (world - 1)
        self.active = [rank for rank, size in enumerate(self.sizes) if size > 0] or [0]
        self.offsets = [sum(self.sizes[:rank]) for rank in range(world)]

    def share(self, tensor: torch.Tensor, batched: bool, rank: int) -> torch.Tensor:
        if not batched:
            return tensor
        start = self.offsets[rank]
        return tensor[start : start + self.sizes[rank]]


class ShardedOutputs(list):
    """Rank 0's outputs of a forward whose shares' graphs the ranks keep under ``token``; when
    the engine drops it (its context released or expired), every rank frees its graph."""

    token: int
    plan: _Plan
    leaves: list[torch.Tensor]
    batched_outputs: list[bool]


class _Wire:
    """Frames between rank 0 and the others over the control group (gloo)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.encoder = Encoder(compression="none")
        self.decoder = Decoder(limits=_INTERNAL_LIMITS)

    # A frame goes as one message of HEAD bytes (its length, then its start) and, when longer,
    # a second with the rest: a small command costs one message, not a length and a payload.
    HEAD = 8192

    def send(self, value: Any, dst: int) -> None:
        data = self.encoder.encode(value)
        head = bytearray(self.HEAD)
        head[:8] = len(data).to_bytes(8, "little")
        first = data[: self.HEAD - 8]
        head[8 : 8 + len(first)] = first
        dist.send(torch.frombuffer(head, dtype=torch.uint8), dst, group=self.group)
        if len(data) > len(first):
            rest = bytearray(data[len(first) :])
            dist.send(torch.frombuffer(rest, dtype=torch.uint8), dst, group=self.group)

    def recv(self, src: int) -> Any:
        head = torch.empty(self.HEAD, dtype=torch.uint8)
        dist.recv(head, src, group=self.group)
        raw = head.numpy()
        size = int.from_bytes(raw[:8].tobytes(), "little")
        if size <= self.HEAD - 8:
            return self.decoder.decode(raw[8 : 8 + size])
        rest = torch.empty(size - (self.HEAD - 8), dtype=torch.uint8)
        dist.recv(rest, src, group=self.group)
        return self.decoder.decode(raw[8:].tobytes() + rest.numpy().tobytes())


class DistributedRunner(TrunkRunner):
    """A :class:`TrunkRunner` whose forwards and gradients run on every rank of the default
    process group; rank 0 drives it (the engine calls it), the others :meth:`follow`."""

    def __init__(
        self,
        module: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype | None,
        *,
        mode: str = "ddp",
        control: Any = None,
    ) -> None:
        if mode not in PARALLEL_MODES:
            raise ValueError(f"--parallel must be one of {PARALLEL_MODES}, got {mode!r}")
        super().__init__(module, device, dtype)
        self.mode = mode
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.wire = _Wire(control)
        self.graphs: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._next_token = 0
        self._to_free: collections.deque[int] = collections.deque()
        self._synced: tuple[int, ...] = ()
        self.broken: str | None = None

    # -- weights -----------------------------------------------------------------------------------

    def broadcast_state(self) -> None:
        """Every rank takes rank 0's whole state_dict (at start, after a checkpoint restore)."""
        with torch.no_grad():
            for tensor in self.module.state_dict().values():
                dist.broadcast(tensor, 0)
        self._synced = self._versions()

    def _versions(self) -> tuple[int, ...]:
        return tuple(p._version for _, p in self.params)

    def _broadcast_params(self) -> None:
        params = [p for _, p in self.params]
        if not params:
            return
        with torch.no_grad():
            flat = torch._utils._flatten_dense_tensors([p.detach() for p in params])
            dist.broadcast(flat, 0)
            if self.rank != 0:
                for param, value in zip(
                    params, torch._utils._unflatten_dense_tensors(flat, params), strict=True
                ):
                    param.copy_(value)
        self._synced = self._versions()

    # -- rank 0: the engine's calls ----------------------------------------------------------------

    def forward(
        self,
        template: Any,
        leaves: list[torch.Tensor],
        training: bool,
        seed: int | None,
        *,
        grad: bool,
        autocast: torch.dtype | None = None,
    ) -> tuple[Any, list[torch.Tensor]]:
        plan = _Plan(leaves, self.world)
        token = -1
        if grad:
            token = self._next_token = self._next_token + 1
        commands = {}
        for rank in range(1, self.world):
            if rank in plan.active:
                value = unflatten(
                    template,
                    [
                        plan.share(t.detach(), b, rank)
                        for t, b in zip(leaves, plan.batched, strict=True)
                    ],
                )
                commands[rank] = {
                    "op": "forward",
                    "value": value,
                    "needs": [t.requires_grad for t in leaves],
                    "training": training,
                    "seed": None if seed is None else (seed + rank) % (1 << 63),
                    "grad": grad,
                    "token": token,
                    "autocast": None if autocast is None else str(autocast).removeprefix("torch."),
                }
            else:
                commands[rank] = {"op": "idle"}
        mine = None
        if 0 in plan.active:
            mine = [
                self._share_leaf(plan.share(t.detach(), b, 0), t.requires_grad)
                for t, b in zip(leaves, plan.batched, strict=True)
            ]
        replies, local, error = self._exchange(
            commands,
            lambda: (
                None
                if mine is None
                else self._forward_share(template, mine, training, seed, grad, token, autocast)
            ),
        )
        if error is not None:
            self._release(token)
            raise error
        out_template, per_rank = self._outputs(plan, local, replies)
        try:
            batched_outputs, outputs = self._gather_outputs(plan, per_rank)
        except InvalidRequest:
            self._release(token)
            raise
        if not grad:
            return out_template, outputs
        result = ShardedOutputs(outputs)
        result.token, result.plan, result.leaves = token, plan, leaves
        result.batched_outputs = batched_outputs
        weakref.finalize(result, self._to_free.append, token)
        return out_template, result

    def _outputs(self, plan: _Plan, local: Any, replies: dict[int, Any]):
        out_template = local[0] if local is not None else None
        per_rank: dict[int, list[torch.Tensor]] = {}
        if local is not None:
            per_rank[0] = local[1]
        for rank, reply in replies.items():
            if rank in plan.active:
                per_rank[rank] = reply["outputs"]
                if out_template is None:
                    out_template = flatten(reply["template"])[0]
        return out_template, per_rank

    def _gather_outputs(self, plan: _Plan, per_rank: dict[int, list[torch.Tensor]]):
        ranks = sorted(per_rank)
        counts = {len(outputs) for outputs in per_rank.values()}
        if len(counts) != 1:
            raise InvalidRequest(f"the ranks' shares gave different numbers of outputs: {counts}")
        batched, outputs = [], []
        for index in range(counts.pop()):
            parts = [per_rank[rank][index].to(self.device) for rank in ranks]
            if len(parts) == 1:
                batched.append(parts[0].dim() >= 1)
                outputs.append(parts[0])
                continue
            if not all(
                p.dim() >= 1 and p.shape[0] == plan.sizes[r]
                for p, r in zip(parts, ranks, strict=True)
            ):
                raise InvalidRequest(
                    f"output {index} of the trunk has no batch dimension first (shapes "
                    f"{[list(p.shape) for p in parts]} for shares {plan.sizes}): a trunk served "
                    "with --parallel must return tensors whose first dimension is the batch"
                )
            batched.append(True)
            outputs.append(torch.cat(parts))
        return batched, outputs

    def gradients(
        self,
        outputs: list[torch.Tensor],
        grads: list[Any],
        inputs: list[torch.Tensor],
        *,
        retain_graph: bool,
        parameters: bool = True,
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        if not isinstance(outputs, ShardedOutputs):
            raise TypeError("DistributedRunner.gradients needs the outputs of its own forward")
        if len(grads) != len(outputs):
            raise InvalidRequest(
                f"Backward got {len(grads)} gradients for a forward with {len(outputs)} outputs"
            )
        plan, token = outputs.plan, outputs.token
        wanted = [next(i for i, leaf in enumerate(outputs.leaves) if leaf is x) for x in inputs]
        ranks = sorted(plan.active)
        commands: dict[int, Any] = {}
        for rank in range(1, self.world):
            if rank in ranks:
                commands[rank] = {
                    "op": "backward",
                    "token": token,
                    "grads": self._grad_shares(outputs, grads, rank),
                    "wanted": wanted,
                    "retain": retain_graph,
                    "parameters": parameters,
                }
            else:
                commands[rank] = {"op": "idle_backward"}
        local_grads = self._grad_shares(outputs, grads, 0) if 0 in ranks else None

        def local() -> Any:
            if local_grads is None:
                return None, [None] * len(self.params)
            return self._backward_share(token, local_grads, wanted, retain_graph, parameters)

        replies, mine, error = self._exchange(commands, local, reduce_grads=True)
        if not retain_graph:
            self._release(token)
        if error is not None:
            raise error
        input_grads_per_rank = {0: mine[0]} if 0 in ranks else {}
        for rank in ranks:
            if rank != 0:
                input_grads_per_rank[rank] = replies[rank]["grads"]
        input_grads: list[torch.Tensor | None] = []
        for position, index in enumerate(wanted):
            parts = [(r, input_grads_per_rank[r][position]) for r in ranks]
            if all(g is None for _, g in parts):
                input_grads.append(None)
            elif plan.batched[index]:
                leaf = outputs.leaves[index]
                input_grads.append(
                    torch.cat(
                        [
                            torch.zeros_like(plan.share(leaf.detach(), True, r))
                            if g is None
                            else g.to(self.device)
                            for r, g in parts
                        ]
                    )
                )
            else:
                total = None
                for _, g in parts:
                    if g is not None:
                        g = g.to(self.device)
                        total = g if total is None else total + g
                input_grads.append(total)
        return input_grads, mine[1]

    def _grad_shares(self, outputs: ShardedOutputs, grads: list[Any], rank: int) -> list[Any]:
        plan = outputs.plan
        several = len(plan.active) > 1
        result: list[Any] = []
        for index, (grad, output) in enumerate(zip(grads, outputs, strict=True)):
            if grad is None:
                result.append(None)
                continue
            if not isinstance(grad, torch.Tensor) or grad.shape != output.shape:
                shape = getattr(grad, "shape", type(grad).__name__)
                raise InvalidRequest(
                    f"gradient {index}: expected a tensor of shape {list(output.shape)}, "
                    f"got {shape}"
                )
            if several and outputs.batched_outputs[index]:
                grad = plan.share(grad, True, rank)
            result.append(grad)
        return result

    def close(self) -> None:
        """Let the other ranks leave :meth:`follow` (rank 0, when the server stops)."""
        if self.broken is None:
            for rank in range(1, self.world):
                try:
                    self.wire.send({"op": "stop"}, rank)
                except RuntimeError as exc:  # that rank is gone already
                    log.info("rank %d is gone already: %s", rank, exc)
        self.broken = "the server stopped"

    # -- the exchange ------------------------------------------------------------------------------

    def _exchange(self, commands: dict[int, Any], local, *, reduce_grads: bool = False):
        """Send each rank its command, run rank 0's share, (sum the parameter gradients,) and
        collect the replies; returns (replies, rank 0's result, the first error or None)."""
        if self.broken is not None:
            raise ServerUnavailable(
                f"the distributed trunk is out of service ({self.broken}): restart the torchrun "
                "server (with --checkpoint it resumes from its last checkpoint)"
            )
        free = list(self._drain_frees())
        sync = self._versions() != self._synced
        try:
            for rank, command in commands.items():
                self.wire.send({**command, "free": free, "sync": sync}, rank)
            self._free(free)
            if sync:
                self._broadcast_params()
            error: BaseException | None = None
            try:
                result = local()
            except Exception as exc:  # noqa: BLE001 - the other ranks still wait for the reduce
                error, result = exc, None
            failed = False
            if reduce_grads:
                failed = self._reduce(result[1] if result is not None else None, error is not None)
            replies = {rank: self.wire.recv(rank) for rank in commands}
        except RuntimeError as exc:
            self.broken = f"a rank failed: {exc}"
            log.error("the distributed trunk lost a rank: %s", exc)
            raise ServerUnavailable(
                f"a rank of the distributed trunk failed ({exc}); restart the torchrun server "
                "(with --checkpoint it resumes from its last checkpoint)"
            ) from exc
        for rank in sorted(replies):
            message = replies[rank].get("error")
            if message is not None and error is None:
                error = InvalidRequest(f"rank {rank}: {message}")
        if failed and error is None:
            error = InvalidRequest("the backward failed on another rank")
        return replies, result, error

    def _reduce(self, param_grads: list[torch.Tensor | None] | None, failed: bool) -> bool:
        """Sum every rank's parameter gradients onto rank 0, in place in ``param_grads``;
        returns whether some rank failed (then nothing is summed)."""
        present = (
            [g is not None for g in param_grads] if param_grads else [False] * len(self.params)
        )
        flags = torch.tensor([float(failed), *map(float, present)], dtype=torch.float64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.wire.group)
        if flags[0] > 0:
            return True
        needed = [i for i, flag in enumerate(flags[1:].tolist()) if flag > 0]
        if not needed:
            return False
        parts = []
        for i in needed:
            grad = param_grads[i] if param_grads else None
            param = self.params[i][1]
            parts.append(torch.zeros_like(param) if grad is None else grad)
        flat = torch._utils._flatten_dense_tensors(parts)
        dist.reduce(flat, 0, op=dist.ReduceOp.SUM)
        if self.rank == 0 and param_grads is not None:
            for i, value in zip(
                needed, torch._utils._unflatten_dense_tensors(flat, parts), strict=True
            ):
                param_grads[i] = value
        return False

    def _release(self, token: int) -> None:
        if token >= 0:
            self._to_free.append(token)

    def _drain_frees(self):
        while self._to_free:
            yield self._to_free.popleft()

    def _free(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.graphs.pop(token, None)

    # -- every rank: its share ---------------------------------------------------------------------

    def _share_leaf(self, tensor: torch.Tensor, need: bool) -> torch.Tensor:
        # detach(): a leaf of its own, not part of rank 0's input's graph.
        return tensor.to(self.device).detach().requires_grad_(need)

    def _forward_share(self, template, leaves, training, seed, grad, token, autocast=None):
        out_template, outputs = TrunkRunner.forward(
            self, template, leaves, training, seed, grad=grad, autocast=autocast
        )
        if grad:
            self.graphs[token] = (outputs, leaves)
        return out_template, outputs

    def _backward_share(self, token, grads, wanted, retain, parameters=True):
        entry = self.graphs.get(token)
        if entry is None:
            raise InvalidRequest(f"no kept forward {token} on rank {self.rank}")
        outputs, leaves = entry
        if not retain:
            del self.graphs[token]
        return TrunkRunner.gradients(
            self,
            outputs,
            grads,
            [leaves[i] for i in wanted],
            retain_graph=retain,
            parameters=parameters,
        )

    # -- ranks 1..N-1 ------------------------------------------------------------------------------

    def follow(self) -> None:
        """Serve rank 0's commands until it says stop (or the group breaks)."""
        while True:
            try:
                command = self.wire.recv(0)
            except RuntimeError as exc:  # rank 0 is gone: torchrun stops the group
                log.error("rank %d: rank 0 is gone (%s); leaving", self.rank, exc)
                raise SystemExit(1) from exc
            op = command["op"]
            if op == "stop":
                return
            self._free(command["free"])
            if command["sync"]:
                self._broadcast_params()
            reply: dict[str, Any] = {}
            try:
                if op == "forward":
                    template, tensors = flatten(command["value"])
                    leaves = [
                        self._share_leaf(t, need)
                        for t, need in zip(tensors, command["needs"], strict=True)
                    ]
                    _, outputs = self._forward_share(
                        template,
                        leaves,
                        command["training"],
                        command["seed"],
                        command["grad"],
                        command["token"],
                        autocast_dtype(command["autocast"] or ""),
                    )
                    reply = {"outputs": [o.detach() for o in outputs], "template": None}
                elif op == "backward":
                    result = None
                    error = None
                    try:
                        result = self._backward_share(
                            command["token"],
                            command["grads"],
                            command["wanted"],
                            command["retain"],
                            command["parameters"],
                        )
                    except Exception as exc:  # noqa: BLE001 - reported to rank 0
                        error = exc
                    self._reduce(result[1] if result else None, error is not None)
                    if error is not None:
                        raise error
                    assert result is not None
                    reply = {"grads": result[0]}
                elif op == "idle_backward":
                    self._reduce(None, False)
            except Exception as exc:  # noqa: BLE001 - reported to rank 0, which answers the call
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            self.wire.send(reply, 0)


def _device(options: ServerOptions) -> torch.device:
    device = torch.device(options.device)
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def serve_distributed(
    module: torch.nn.Module,
    address: str,
    options: ServerOptions,
    mode: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Any:
    """Under torchrun: join the process group; rank 0 starts and returns the trunk server,
    the other ranks follow its commands and return None once it stops."""
    from .codec import DTYPES
    from .engine import TrunkEngine
    from .server import TrunkServer

    if mode not in PARALLEL_MODES:
        raise SystemExit(f"--parallel must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
    if "RANK" not in os.environ:
        raise SystemExit(
            "--parallel needs torchrun: torchrun --nproc-per-node N -m remote_autograd serve ..."
        )
    device = _device(options)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not timeout > 0:
        raise SystemExit(f"--dist-timeout must be a positive number of seconds, got {timeout}")
    delta = datetime.timedelta(seconds=timeout)
    dist.init_process_group(backend, timeout=delta)
    control = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=delta)
    dtype = DTYPES[options.dtype] if options.dtype else None
    runner = DistributedRunner(module, device, dtype, mode=mode, control=control)
    if runner.rank != 0:
        runner.broadcast_state()
        log.info("rank %d of %d following rank 0", runner.rank, runner.world)
        try:
            runner.follow()
        finally:
            dist.destroy_process_group()
        return None
    engine = TrunkEngine(module, options, runner=runner)
    runner.broadcast_state()
    server = TrunkServer(engine, address).start()
    log.info("rank 0 of %d serves the trunk (%s, %s)", runner.world, mode, backend)
    return server
