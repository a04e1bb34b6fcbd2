"""Overlap inside one call: a Compute (and its Backward) in micro-batches, all in flight at once.

With ``micro_batches=k`` (``ClientOptions.micro_batches`` or ``RemoteModule(...,
micro_batches=k)``) a forward through the trunk is k Compute calls on k slices of the batch,
sent at once from k threads: the server computes slice i while slice i+1 is still arriving and
sends slice i's output back while it computes slice i+1; the Backward likewise. Each slice is
an ordinary :class:`~remote_autograd.function.RemoteCall` (its own context, retries, recovery);
:class:`ChunkedCall` stands for them in front of the autograd Function.

Valid only for trunks that treat the samples of a batch independently (no BatchNorm in
training mode): the trunk's outputs are then the slices' outputs concatenated. Input tensors
whose dimension 0 is the batch are sliced; others (a ``(1, T)`` position tensor) go whole to
every slice, and their gradient is the sum of the slices'.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .errors import TrunkError
from .function import RemoteCall
from .shares import join_grads

__all__: list[str] = []


class ChunkedCall:
    """One forward through the trunk as ``micro_batches`` concurrent RemoteCalls."""

    def __init__(
        self,
        client: Any,
        template: Any,
        *,
        keep_context: bool,
        training: bool,
        device: torch.device,
        micro_batches: int,
        autocast: str = "",
        frozen: Callable[[], bool] = lambda: False,
    ) -> None:
        self.client = client
        self.autocast = autocast  # given to every slice's RemoteCall (see there)
        self.frozen = frozen
        self.template = template
        self.keep_context = keep_context
        self.training = training
        self.device = device
        self.micro_batches = micro_batches
        self.output_template: Any = None
        self.calls: list[RemoteCall] = []
        self._inputs: tuple[torch.Tensor, ...] = ()  # set by the autograd Function
        self._sliced: list[bool] = []  # per input: sliced along dimension 0, or sent whole
        self._output_rows: list[list[int]] = []  # per output: its rows in each slice
        self._slice_rows: list[int] = []  # the batch's rows in each slice
        self.given_seeds: list[int] | None = None  # a recompute's: its first run's seeds
        self._recovering = _OneAtATime()  # slices re-create lost contexts one at a time

    def forward(self, tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        rows = next((t.shape[0] for t in tensors if t.dim() > 0), 0)
        k = min(self.micro_batches, (rows + 1) // 2)  # some slice holds 2 samples or more
        if k <= 1:  # nothing to slice: one ordinary call
            call = self._new_call(tuple(t.detach() for t in tensors))
            call.given_seeds = self.given_seeds
            outputs = call.forward(tensors)
            self.calls, self.output_template = [call], call.output_template
            return outputs
        self._sliced = [t.dim() > 0 and t.shape[0] == rows for t in tensors]
        self._slice_rows = _slice_rows(rows, k)
        pieces = [
            torch.split(t.detach(), self._slice_rows) if sliced else (t.detach(),) * k
            for t, sliced in zip(tensors, self._sliced, strict=True)
        ]
        # What each slice's forward is given: its pieces, requiring grad as the inputs do.
        sent = [
            tuple(
                p[i].requires_grad_(t.requires_grad) for p, t in zip(pieces, tensors, strict=True)
            )
            for i in range(k)
        ]
        self.calls = [self._new_call(tuple(p[i] for p in pieces)) for i in range(k)]
        # The handshake once, here: concurrent first calls would each wait for the channel
        # (grpc.channel_ready_future), leaving polling threads behind.
        self.client.info()
        given = self.given_seeds if self.given_seeds and len(self.given_seeds) == k else None
        for index, call in enumerate(self.calls):
            # The slices' dropout seeds in slice order, whatever order the threads run in.
            call.seed = given[index] if given else self.client._next_seed(self.training)
        try:
            return self._joined(sent, rows, k)
        except BaseException:
            # No autograd node will hold these calls: the slices that were answered would keep
            # their contexts on the server until context_ttl (and hold up others' Steps).
            self.release()
            raise

    def _joined(self, sent: list[tuple[torch.Tensor, ...]], rows: int, k: int) -> list:
        """Run the slices' forwards and join their outputs along the batch."""
        try:
            results = _run_all(
                [lambda c=call, s=s: c.forward(s) for call, s in zip(self.calls, sent, strict=True)]
            )
        except TrunkError as exc:
            sliced = [i for i, cut in enumerate(self._sliced) if cut]
            exc.add_note(
                f"micro_batches={k}: input tensors {sliced} were sliced along dimension 0, "
                f"which held the batch ({rows} samples) in each; if the trunk takes one whose "
                "first dimension only happens to equal the batch, use micro_batches=1"
            )
            raise
        for call in self.calls:
            call._inputs = tuple(t.detach() for t in call._inputs)
        self.output_template = self.calls[0].output_template
        if any(call.output_template != self.output_template for call in self.calls):
            raise ValueError(
                f"micro_batches={self.micro_batches}: the trunk's output is not the same tree "
                "with the same plain values (numbers, strings) for every slice of the batch, so "
                "the slices' outputs cannot be joined. Use micro_batches=1 for this trunk"
            )
        outputs = []
        for index, parts in enumerate(zip(*results, strict=True)):
            if any(p.dim() == 0 for p in parts) or [p.shape[0] for p in parts] != self._slice_rows:
                raise ValueError(
                    f"micro_batches={self.micro_batches} needs every trunk output to hold the "
                    f"batch ({rows} samples) in dimension 0, as many rows as each slice's "
                    f"inputs {self._slice_rows}; output {index} has shapes "
                    f"{[tuple(p.shape) for p in parts]}. Use micro_batches=1 for this trunk"
                )
            self._output_rows.append([p.shape[0] for p in parts])
            outputs.append(torch.cat(parts))
        return outputs

    @property
    def without_grad(self) -> list[bool]:
        """Per output: no slice's needs a gradient (unknown, [], if a slice's is)."""
        flags = [call.without_grad for call in self.calls]
        if not flags or any(len(f) != len(flags[0]) for f in flags) or not flags[0]:
            return []
        return [all(column) for column in zip(*flags, strict=True)]

    def _new_call(self, inputs: tuple[torch.Tensor, ...]) -> RemoteCall:
        call = RemoteCall(
            self.client,
            self.template,
            keep_context=self.keep_context,
            training=self.training,
            device=self.device,
            autocast=self.autocast,
            frozen=self.frozen,
        )
        call._inputs = inputs
        call.recovering = self._recovering
        return call

    @property
    def nonfinite(self) -> bool:
        """Some slice's trunk gradients were NaN/inf (and not kept): GradScaler's inf check."""
        return any(call.nonfinite for call in self.calls)

    def backward(
        self,
        grads: tuple[torch.Tensor | None, ...],
        needs_input_grad: tuple[bool, ...],
        parameters: bool = True,
    ) -> list[torch.Tensor | None]:
        if len(self.calls) == 1:
            return self.calls[0].backward(grads, needs_input_grad, parameters)
        # A deferred zero_grad() or clip scale must reach the server before any slice's
        # gradients do: the slices' Backwards arrive in no fixed order.
        self.client.apply_grad_ops()
        split = [
            (None,) * len(self.calls) if g is None else torch.split(g, rows)
            for g, rows in zip(grads, self._output_rows, strict=True)
        ]
        try:
            results = _run_all(
                [
                    lambda c=call, i=i: c.backward(
                        tuple(s[i] for s in split), needs_input_grad, parameters
                    )
                    for i, call in enumerate(self.calls)
                ]
            )
        except Exception as exc:
            exc.add_note(
                f"micro_batches={len(self.calls)}: the slices whose Backward was answered "
                "have added their gradients to the trunk's; call zero_grad() before redoing "
                "this step"
            )
            raise
        return [
            join_grads(parts, self._sliced[index], [c._inputs[index] for c in self.calls])
            for index, parts in enumerate(zip(*results, strict=True))
        ]

    def seeds(self) -> list[int]:
        return [call.seed for call in self.calls]

    def release(self) -> None:
        for call in self.calls:
            call.release()
        if any(call.backwards for call in self.calls):
            self._inputs = ()  # as RemoteCall.release


def _slice_rows(rows: int, k: int) -> list[int]:
    """Rows of each of ``k`` slices of ``rows`` (k <= rows / 2, rounded up): near-equal, and
    never all equal. An output without the batch (a (1, D) embedding, a statistic, a fixed
    memory) then differs from some slice's rows and is refused, at any batch size, instead
    of being joined into a tensor as long as the batch."""
    base, extra = divmod(rows, k)
    sizes = [base + 1] * extra + [base] * (k - extra)
    if extra == 0:  # base >= 2 here
        sizes[0], sizes[-1] = base + 1, base - 1
    return sizes


class _OneAtATime:
    """Held while a slice re-creates its lost context and retries its Backward, so that under
    a tight context limit the slices' re-created contexts do not evict each other. Once one
    slice's recovery fails, the slices waiting give up with its error: each would otherwise
    wait out a deadline of its own, one after another, against the same server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failed: BaseException | None = None

    def __enter__(self) -> None:
        self._lock.acquire()
        if self._failed is not None:
            self._lock.release()
            raise self._failed

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        if error is not None:
            self._failed = error
        self._lock.release()


def _run_all(jobs: list[Any]) -> list[Any]:
    """Run the calls at once, one thread each; the first error is raised after all ended."""
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="ra-slice") as pool:
        futures = [pool.submit(job) for job in jobs]
        return [future.result() for future in futures]
