"""Pipelined training: the client's bottom and top work on one micro-batch while the trunk
server works on another.

:class:`PipelinedStep` runs one batch as ``micro_batches`` micro-batches. The graph is cut at
the trunk's boundary, so each part's backward is driven on its own: the trunk's Compute and
Backward RPCs run on one worker thread (the *trunk lane*, FIFO, so the server sees them in a
fixed order), the bottom and top on the caller's thread. The schedule is one-forward-one-
backward (1F1B) with ``depth`` micro-batches in the trunk ahead of the top::

    client: b0 b1 t0 b2 t1 b3 B0 t2 B1 t3 B2 B3   b = bottom forward, t = top fwd + bwd
    trunk :    f0 f1 g0 f2 g1 f3 g2 g3             B = bottom backward, f/g = trunk fwd/bwd

With ``split_backward=True`` each ``t`` is cut in two: the top's forward and the gradient of
the trunk's output, then (once ``g`` is queued) the top's parameters' gradients, beside ``g``.

Each part's gradients accumulate in micro-batch order (top 0, 1, ...; trunk 0, 1, ...; bottom
0, 1, ...) and the trunk's Computes go out in micro-batch order, so the gradients, and the
trunk's dropout under ``ClientOptions(seed=...)``, are those of the plain loop over the same
micro-batches. (A parameter shared by bottom and top, such as GPT-2's tied embedding and LM
head, gets its two contributions summed in another order: equal up to float rounding.) The
client-side RNG (dropout in bottom or top) is drawn in the schedule's order: reproducible
under ``torch.manual_seed``, but not the plain loop's masks.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from .fingerprint import computes_over_batch
from .split_backward import backward_inputs_first
from .tree import flatten, unflatten

__all__ = ["PipelinedStep", "batch_rows", "split_batch"]

log = logging.getLogger(__name__)


def split_batch(value: Any, micro_batches: int) -> list[Any]:
    """Split every tensor in ``value`` (a tensor, or lists, tuples, dicts and UserDicts, such
    as a tokenizer's BatchEncoding, of them) along dimension 0 into ``micro_batches`` parts
    (sizes differ by at most one, like ``torch.tensor_split``); values that are not tensors go
    to every part unchanged."""
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
    rows = batch_rows(value)
    if rows < micro_batches:
        raise ValueError(
            f"a batch of {rows} samples cannot be split into micro_batches={micro_batches}"
        )
    return _split_rows(value, _part_rows(rows, micro_batches))


def batch_rows(value: Any, what: str = "the batch") -> int:
    """The size of dimension 0 that every tensor in ``value`` shares."""
    _, tensors = flatten(value)
    if not tensors:
        raise ValueError(f"{what} holds no tensor to split into micro-batches")
    sizes = {t.shape[0] if t.dim() else None for t in tensors}
    if None in sizes or len(sizes) != 1:
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(
            f"every tensor of {what} needs the same size in dimension 0 (the batch); got {shapes}"
        )
    rows = sizes.pop()
    assert rows is not None
    return rows


def _part_rows(rows: int, parts: int) -> list[int]:
    """``torch.tensor_split``'s sizes: the first ``rows % parts`` parts one row longer."""
    return [rows // parts + (i < rows % parts) for i in range(parts)]


def _split_rows(value: Any, sizes: list[int]) -> list[Any]:
    template, tensors = flatten(value)
    pieces = [torch.split(t, sizes, dim=0) for t in tensors]
    return [unflatten(template, [p[i] for p in pieces]) for i in range(len(sizes))]


def _split_labels(y: Any, sizes: list[int]) -> list[Any]:
    """``y`` split as the batch was (``sizes``: samples per micro-batch). Labels with one row
    per sample are split like it; labels with k rows per sample (per-token labels flattened
    sample by sample, ``y.view(-1)``) give each micro-batch the rows of its samples; labels
    with no tensor go whole to every micro-batch."""
    if not flatten(y)[1]:
        return [y] * len(sizes)
    rows, samples = batch_rows(y, "y (the labels)"), sum(sizes)
    if rows % samples:
        raise ValueError(
            f"y (the labels) has {rows} rows in dimension 0 and x (the batch) {samples}: "
            "PipelinedStep splits both by samples, so y needs one row per sample of x, or the "
            "same number of rows for each (per-token labels flattened sample by sample)"
        )
    return _split_rows(y, [size * (rows // samples) for size in sizes])


class _Cut:
    """A value whose grad-requiring tensors were detached into leaves: the graph's seam."""

    def __init__(self, value: Any, modifiable: bool = False) -> None:
        """``modifiable``: the next part may change the value in place (the top, as a local
        layer's output may be: ``ReLU(inplace=True)``), which a leaf does not allow; it gets
        a copy of each leaf."""
        template, tensors = flatten(value)
        self.sources: list[torch.Tensor] = []  # the tensors before the cut (still in the graph)
        self.leaves: list[torch.Tensor] = []  # their detached stand-ins
        cut = []
        for tensor in tensors:
            if tensor.requires_grad:
                leaf = tensor.detach().requires_grad_()
                self.sources.append(tensor)
                self.leaves.append(leaf)
                cut.append(leaf.clone() if modifiable else leaf)
            else:
                cut.append(tensor)
        self.value = unflatten(template, cut)

    def backward(self) -> None:
        """Carry the leaves' gradients on through the graph before the cut."""
        pairs = [
            (s, leaf.grad)
            for s, leaf in zip(self.sources, self.leaves, strict=True)
            if leaf.grad is not None
        ]
        self.sources, self.leaves = [], []  # drop the graph as soon as it has been used
        if pairs:
            torch.autograd.backward([s for s, _ in pairs], [g for _, g in pairs])


class PipelinedStep:
    """``loss = step(x, y)``: forward and backward of one batch through ``bottom``, ``trunk``
    and ``top`` in ``micro_batches`` pipelined micro-batches; the gradients are left in the
    parameters (and the trunk server's session) for the usual ``opt.step()``.

    ``h = bottom(x_i)``, ``z = trunk(h)``, ``out = top(z)``, ``loss_i = loss_fn(out, y_i)``: each
    part is any callable (an ``nn.Module``; ``trunk`` usually holds a
    :class:`~remote_autograd.RemoteModule`), their values tensors or lists, tuples and dicts
    of tensors. ``x`` is split along dimension 0 (:func:`split_batch`; a batch of fewer
    samples than ``micro_batches`` runs one per sample), ``y`` with its samples (one row each,
    or k: per-token labels flattened, ``labels.view(-1)``).

    ``reduction="mean"`` (for a loss that is a mean over the batch): micro-batch i's loss is
    weighted by ``weight(y_i) / sum(weight(y_j))``, where ``weight`` defaults to the number of
    samples; pass e.g. the count of non-ignored labels for a token-mean loss. ``"sum"``: the
    losses are added. The returned loss is that weighted sum, detached (backward already ran).

    ``scaler``: a ``torch.amp.GradScaler`` (fp16 autocast): each micro-batch's weighted loss is
    scaled by it before its backward, as ``scaler.scale(loss).backward()`` does in the plain
    loop; then ``scaler.step(trunk_opt)``, ``scaler.step(opt)`` and ``scaler.update()`` as
    usual. The returned loss is unscaled.

    ``split_backward=True``: the top's backward runs in two passes, the gradient of the trunk's
    output first, the top's own parameters' while the trunk's Backward runs
    (:mod:`remote_autograd.split_backward`). Equal bit for bit; but a hook on a tensor made by
    one of the top's layers with parameters (``out.register_hook``, ``out.retain_grad()``) runs
    twice, so it is off by default.

    Valid when the samples of a batch are independent in every part: no BatchNorm in training
    mode, no loss that couples samples (see docs/pipeline.md).
    """

    def __init__(
        self,
        bottom: Callable[[Any], Any],
        trunk: Callable[[Any], Any],
        top: Callable[[Any], Any],
        loss_fn: Callable[[Any, Any], torch.Tensor],
        *,
        micro_batches: int = 4,
        depth: int = 2,
        reduction: str = "mean",
        weight: Callable[[Any], float] | None = None,
        split_backward: bool = False,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int):
            raise ValueError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(
                "depth (micro-batches in the trunk ahead of the top) must be an int >= 1, "
                f"got {depth!r}"
            )
        if not isinstance(split_backward, bool):
            raise ValueError(f"split_backward must be True or False, got {split_backward!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise ValueError(
                f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}"
            )
        self.bottom = bottom
        self.trunk = trunk
        self.top = top
        self.loss_fn = loss_fn
        self.micro_batches = micro_batches
        self.depth = depth
        self.reduction = reduction
        self.weight = weight
        self.split_backward = split_backward
        self.scaler = scaler

    def scales(self, ys: list[Any], samples: list[int] | None = None) -> list[float]:
        """What each micro-batch's loss is multiplied by (see the class docstring);
        ``samples``: how many each holds (by default, the rows of its ``y``; give them where
        ``y`` holds no tensor, or the pieces weigh alike). A total weight of 0 (every label
        ignored) raises ValueError: there is no mean to take."""
        if self.reduction == "sum":
            return [1.0] * len(ys)
        if self.weight:
            weights = [float(self.weight(y)) for y in ys]
        else:
            weights = [float(n) for n in samples] if samples else [float(_rows(y)) for y in ys]
        total = sum(weights)
        if not total > 0:
            raise ValueError(f"the micro-batches' loss weights sum to {total}; nothing to average")
        return [w / total for w in weights]

    def __call__(self, x: Any, y: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():
            raise RuntimeError("PipelinedStep runs backward: call it with grad mode on")
        rows = batch_rows(x, "x (the batch)")
        if rows == 0:
            raise ValueError("x (the batch) holds no sample: there is nothing to step")
        # A batch with fewer samples than micro_batches (a loader's last) runs one per sample.
        m = min(self.micro_batches, rows)
        sizes = _part_rows(rows, m)
        xs, ys = _split_rows(x, sizes), _split_labels(y, sizes)
        scales = self.scales(ys, sizes)
        self._check_batch_statistics()
        bottoms: dict[int, _Cut] = {}
        trunk_out: dict[int, Future] = {}
        trunk_back: dict[int, Future] = {}
        total: torch.Tensor | None = None
        seam: _Cut | None = None
        forwarded: Future | None = None
        finish_top: Callable[[], None] | None = None  # the top's second backward pass
        interrupted = trunk_failed = False
        lane = _Lane() if self._local_trunk() else ThreadPoolExecutor(1, "ra-trunk-lane")
        # Autocast is per thread: the lane's trunk forward runs under the caller's, as the plain
        # loop's would (and RemoteModule tells the server, which runs the trunk under it).
        autocasts = [
            (device, torch.get_autocast_dtype(device))
            for device in ("cpu", "cuda")
            if torch.is_autocast_enabled(device)
        ]
        try:

            def forward_bottom(i: int) -> None:
                # A trunk that is not a RemoteModule alone may change its input in place
                # (ReLU(inplace=True) first), as it may the bottom's output in the plain loop.
                bottoms[i] = _Cut(self.bottom(xs[i]), modifiable=not self._remote_only())
                trunk_out[i] = lane.submit(self._trunk_forward, bottoms[i].value, autocasts)

            def carry(i: int) -> None:
                """Micro-batch i on through the trunk's backward and then the bottom's."""
                nonlocal trunk_failed
                try:
                    backward = trunk_back.pop(i)
                    if backward.exception() is not None:  # waits for it
                        trunk_failed = True
                    backward.result()
                    bottoms.pop(i).backward()
                except Exception as exc:
                    exc.add_note(_mixed(i))
                    raise _Broken(exc) from exc

            for i in range(min(self.depth, m)):
                forward_bottom(i)
            for i in range(m):
                # Top forward and backward of micro-batch i, on the trunk's output.
                forwarded = trunk_out.pop(i)
                if forwarded.exception() is not None:  # waits for it
                    trunk_failed = True
                seam = _Cut(forwarded.result(), modifiable=True)
                loss = self.loss_fn(self.top(seam.value), ys[i])
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError(
                        f"loss_fn must return a tensor with one element, got {_describe(loss)}"
                    )
                scaled = loss * scales[i] if self.reduction == "mean" else loss
                root = scaled if self.scaler is None else self.scaler.scale(scaled)
                if self.split_backward:  # the seam's gradient now, the top's weights' below
                    finish_top = backward_inputs_first(root, seam.leaves)
                else:
                    root.backward()
                total = scaled.detach() if total is None else total + scaled.detach()
                del loss, scaled, root
                trunk_back[i] = lane.submit(seam.backward)  # the Backward RPC, in the lane
                if finish_top is not None:
                    try:
                        finish_top()  # while the trunk computes its Backward
                    except Exception as exc:
                        exc.add_note(
                            f"micro-batch {i}'s gradients reached only some of the top's "
                            "parameters; call zero_grad() on both optimizers before the next step"
                        )
                        raise
                    finish_top = None
                if i + self.depth < m:
                    forward_bottom(i + self.depth)  # overlaps trunk backward i
                if i > 0:  # the bottom's backward of the micro-batch before, whose trunk
                    # backward ran while this one's top did
                    carry(i - 1)
            carry(m - 1)
        except _Broken as broken:
            raise broken.error from None  # its note says the parts hold a mix
        except Exception as exc:
            # Micro-batches whose top backward ran go on, so that every part holds the same
            # ones, as after the plain loop over them.
            for i in sorted(trunk_back):
                try:
                    carry(i)
                except _Broken:
                    exc.add_note(_mixed(i))
                    break
            raise
        except BaseException as exc:  # KeyboardInterrupt...: stop now, and say what is left
            interrupted = True
            if trunk_back or bottoms:
                exc.add_note(
                    "the step was interrupted between micro-batches: the parts hold gradients "
                    "of different micro-batches; call zero_grad() on both optimizers before "
                    "the next step"
                )
            raise
        finally:
            # After an error in the bottom or the top, the trunk forwards already queued still
            # run (their contexts are released with their outputs below): whether one had
            # started would otherwise depend on thread timing, and each moves the dropout seeds
            # of later forwards (ClientOptions.seed). After the trunk's own error or an
            # interrupt they are dropped, not tried again; one in flight finishes first.
            lane.shutdown(wait=True, cancel_futures=interrupted or trunk_failed)
            # An exception kept by the caller keeps this frame: not the outputs' graphs and
            # their server contexts.
            bottoms.clear()
            trunk_out.clear()
            trunk_back.clear()
            forwarded = seam = finish_top = None
        assert total is not None
        return total

    def _trunk_forward(self, value: Any, autocasts: list[tuple[str, torch.dtype]]) -> Any:
        with torch.enable_grad(), contextlib.ExitStack() as stack:  # grad mode is per thread
            for device, dtype in autocasts:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            return self.trunk(value)

    def _remote_only(self) -> bool:
        """The trunk is a RemoteModule itself: the server gets its own copy of the inputs."""
        from .module import RemoteModule

        return isinstance(self.trunk, RemoteModule)

    def _check_batch_statistics(self) -> None:
        """Warn of a part that computes over the batch (in training mode, or a BatchNorm
        without running statistics; a local module, or a served trunk's): a micro-batch is
        then normalised by its own statistics, and running statistics move once per
        micro-batch, not once per batch."""
        for name, part in (("bottom", self.bottom), ("trunk", self.trunk), ("top", self.top)):
            if not isinstance(part, nn.Module):
                continue
            found = next(filter(None, (_over_batch(m) for m in part.modules())), "")
            if found:
                warnings.warn(
                    f"PipelinedStep: the {name} holds {found}, which computes statistics over "
                    "the batch (in training mode): each micro-batch is normalised "
                    "by its own and its running statistics move once per micro-batch, so the "
                    "step is not the whole batch's (docs/pipeline.md, When it is valid)",
                    stacklevel=3,
                )

    def _check_shared_with_the_lane(self, trunk_modules: list[nn.Module]) -> None:
        """Warn of a parameter that a local layer of the trunk (beside a RemoteModule, so run
        on the trunk lane) shares with the bottom or the top, whose backwards run on the
        caller's thread meanwhile: its contributions are added in another order than the plain
        loop adds them, which may change from run to run."""
        from .module import RemoteModule

        lane = {
            id(p)
            for m in trunk_modules
            if not isinstance(m, RemoteModule)
            for p in m.parameters(recurse=False)
            if p.requires_grad  # a frozen one gets no gradient to add in any order
        }
        for name, part in (("bottom", self.bottom), ("top", self.top)):
            if lane & _parameters(part):
                warnings.warn(
                    f"PipelinedStep: the {name} shares a parameter with a local layer of the "
                    "trunk, whose backward runs on the trunk's worker thread while the "
                    f"{name}'s runs on this one: that parameter's gradient equals the plain "
                    "loop's up to float rounding only, not bit for bit, and may differ from "
                    "run to run. Keep the layer in one part",
                    stacklevel=4,
                )

    def _local_trunk(self) -> bool:
        """A trunk module without a RemoteModule in it runs on the caller's thread: there is
        no server to overlap with, and its dropout then draws from the process's RNG in order,
        not at the same time as the bottom's. Local dropout beside a RemoteModule would draw
        at the same time: warned."""
        from .module import RemoteModule  # module.py imports the client, which is heavy

        trunk = self.trunk
        if not isinstance(trunk, nn.Module):
            return False
        modules = list(trunk.modules())
        if not any(isinstance(module, RemoteModule) for module in modules):
            return True
        self._check_shared_with_the_lane(modules)
        if trunk.training and any(_random(module) for module in modules):
            warnings.warn(
                "PipelinedStep: the trunk holds a RemoteModule and a local dropout layer; that "
                "layer runs on the trunk's worker thread while the bottom runs on this one, "
                "both drawing from the process's one random generator, so its masks are not "
                "reproducible under torch.manual_seed. Move it into the bottom or the top",
                stacklevel=3,
            )
        return False


def _parameters(part: Any) -> set[int]:
    """The trainable parameters of a part that is a module (a function cannot be looked into)."""
    if not isinstance(part, nn.Module):
        return set()
    return {id(p) for p in part.parameters() if p.requires_grad}


def _over_batch(module: nn.Module) -> str:
    """The class that ``module`` runs over the batch in its training forward, "" if none: its
    own, or a served trunk's (as its server says)."""
    from .module import RemoteModule

    if isinstance(module, RemoteModule):
        return module.batch_statistics() if module.training else ""
    return type(module).__name__ if computes_over_batch(module, module.training) else ""


def _random(module: nn.Module) -> bool:
    """A local dropout layer that draws in training mode."""
    return isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0


class _Lane:
    """The trunk lane of a local trunk: each call runs at once, on the caller's thread."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - raised where the result is taken, as a lane's
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


class _Broken(Exception):
    """A micro-batch could not be carried on through the trunk and the bottom (``error``)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _mixed(i: int) -> str:
    return (
        f"micro-batch {i} could not go on through the trunk and the bottom: they hold "
        "gradients of other micro-batches than the top; call zero_grad() on both optimizers "
        "before the next step"
    )


def _rows(value: Any) -> int:
    _, tensors = flatten(value)
    return tensors[0].shape[0] if tensors and tensors[0].dim() else 1


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
