"""A backward in two passes: the gradients of some inputs first, the parameters' after.

``finish = backward_inputs_first(loss, inputs)`` leaves in ``inputs`` (leaf tensors) the gradients
that ``loss.backward()`` would, and computes nothing else it need not; ``finish()`` then
accumulates the parameters' gradients, so that after both every ``.grad`` holds what one
``loss.backward()`` would have left, bit for bit. :class:`~remote_autograd.PipelinedStep` runs
the top's backward this way (``split_backward=True``): the trunk's Backward waits only for the
gradient of the trunk's output, and the top's weight gradients (for a language model, the
vocabulary-sized head's, a third of the top's work) are computed while the trunk computes.
Zero-bubble pipeline schedules call this the B/W split.

How. The graph is walked from the loss. A node is *on the path* when an input is reached from
it. Pass 1 is ``torch.autograd.grad(loss, inputs)``: autograd runs only the nodes on the path,
and each computes only the outputs that lead on along it (a Linear's node computes the
gradient of its input, not of its weight). A *split* node is a node on the path with an edge
off it, towards parameters; pass 1 also captures the gradient arriving at each split node, as
it arrives (before the node's hooks run). Pass 2 runs each split node again from that
gradient, with ``inputs=`` the leaves below its edges off the path, so that it computes only
those edges' gradients, and autograd carries them on down to the parameters.

That restriction holds only where no leaf is below two split nodes. Otherwise, where a split
node is a Python ``autograd.Function`` (whose backward computes every output, and would run
twice), and where the graph holds a reentrant ``torch.utils.checkpoint`` (it refuses
``autograd.grad`` and ``inputs=``), the loss gets one plain ``backward()`` at once and
``finish`` does nothing.

The inputs' gradients are accumulated as autograd's accumulator does: a copy in the input's
layout, added in place to a gradient already there, then the input's post-accumulate hooks.

Hooks. A split node runs in both passes, and so do the hooks of the tensors it made (for
``out = linear(x)``: ``out.register_hook(...)``, ``out.retain_grad()``). A hook that returns
the same gradient from the same input keeps the numbers equal, but its side effects happen
twice, ``retain_grad()`` accumulates twice, and a hook that changes its gradient in place
(which PyTorch forbids, but one backward tolerates) is applied twice. So do hooks on a split
node itself (``out.grad_fn.register_hook``) and the legacy ``Module.register_backward_hook``,
each pass with part of the node's gradients. The parameters' own hooks run once, in pass 2;
full module backward hooks once, in pass 1.

The graph. Pass 1 keeps the graph (``retain_graph=True``); pass 2 frees what it runs. The rest
(the saved tensors of the nodes on the path above the split nodes) lives as long as the loss or
the top's outputs are referenced, and a second ``loss.backward()`` through it would not raise:
drop them after ``finish()``. A non-reentrant checkpoint recomputes its region in each pass
that runs through it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import torch
from torch.autograd.function import BackwardCFunction
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge
from torch.utils.checkpoint import CheckpointFunction

__all__ = ["backward_inputs_first"]


def backward_inputs_first(loss: torch.Tensor, inputs: Sequence[torch.Tensor]) -> Callable[[], None]:
    """Accumulate ``loss``'s gradients into the leaf tensors ``inputs`` now, and return what
    accumulates the rest (see the module docstring)."""
    for t in inputs:
        if not t.is_leaf:
            raise ValueError(
                "backward_inputs_first: inputs must be leaf tensors (detach().requires_grad_() "
                f"them); got one made by {type(t.grad_fn).__name__}"
            )
    root = loss.grad_fn
    ends = {get_gradient_edge(t).node: t for t in inputs if t.requires_grad}
    graph = _Graph(root, loss.output_nr, ends) if root is not None and ends else None
    if graph is None or graph.whole:  # one plain backward (torch's own errors included)
        loss.backward()
        return _nothing
    reached = [t for node, t in ends.items() if graph.on_path.get(node)]  # the loss may skip one
    edges = [get_gradient_edge(t) for t in reached]
    edges += [GradientEdge(node, k) for node, slots in graph.splits.items() for k in slots]
    grads = torch.autograd.grad(
        loss, edges, retain_graph=True, allow_unused=True, materialize_grads=False
    )
    for tensor, grad in zip(reached, grads[: len(reached)], strict=True):
        if grad is not None:
            _accumulate(tensor, grad)
    captured = iter(grads[len(reached) :])
    work: collections.deque = collections.deque()
    for node, slots in graph.splits.items():
        arriving = [(GradientEdge(node, k), g) for k in slots if (g := next(captured)) is not None]
        if arriving:
            work.append((arriving, graph.below[node]))

    def finish() -> None:
        while work:
            arriving, leaves = work.popleft()  # drop each node's gradients once used
            torch.autograd.backward(
                [edge for edge, _ in arriving], [g for _, g in arriving], inputs=leaves
            )

    return finish


def _accumulate(tensor: torch.Tensor, grad: torch.Tensor) -> None:
    """What autograd's accumulator does with a leaf's gradient: a copy in the leaf's layout
    (``grad`` may be an expanded view, or the very tensor captured for pass 2), added in place
    to a gradient already there; then the leaf's post-accumulate hooks."""
    with torch.no_grad():
        if tensor.grad is None:
            tensor.grad = grad.clone() if grad.is_sparse else torch.empty_like(tensor).copy_(grad)
        elif tensor.grad.is_sparse and not grad.is_sparse:  # a dense sum cannot go in place
            tensor.grad = tensor.grad + grad
        else:
            tensor.grad += grad
    for hook in (getattr(tensor, "_post_accumulate_grad_hooks", None) or {}).values():
        hook(tensor)


def _nothing() -> None:
    pass


class _Graph:
    """The autograd graph below ``root``: which nodes lead to ``ends`` (the path), the split
    nodes with the input slots a gradient arrives in, the leaves below each one's edges off the
    path, and whether the loss must get one plain backward (``whole``) instead."""

    def __init__(self, root: Node, output_nr: int, ends: dict[Node, torch.Tensor]) -> None:
        edges: dict[Node, list[tuple[Node, int]]] = {}  # each node below root: its edges
        slots: dict[Node, set[int]] = {root: {output_nr}}
        order: list[Node] = []  # each node after every node below it
        stack: list[tuple[Node, bool]] = [(root, False)]
        while stack:  # depth first, without recursion: graphs can be thousands deep
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if node in edges:
                continue
            edges[node] = [(c, slot) for c, slot in node.next_functions if c is not None]
            stack.append((node, True))
            for child, slot in edges[node]:
                slots.setdefault(child, set()).add(slot)
                if child not in edges:
                    stack.append((child, False))
        self.on_path: dict[Node, bool] = {}
        for node in order:
            self.on_path[node] = node in ends or any(self.on_path[c] for c, _ in edges[node])
        self.splits: dict[Node, list[int]] = {}
        self.below: dict[Node, list[torch.Tensor]] = {}
        # A reentrant checkpoint refuses autograd.grad() (pass 1) and backward(inputs=) (pass 2),
        # on the path or off it.
        whole = any(getattr(node, "_forward_cls", None) is CheckpointFunction for node in order)
        for node in reversed(order):  # from the loss down: autograd's order in pass 2
            if not self.on_path[node]:
                continue
            below = _leaves([c for c, _ in edges[node] if not self.on_path[c]], edges)
            if below:  # (edges off the path to no leaf change nothing)
                # A Python Function's backward computes every output, and would run twice.
                whole |= isinstance(node, BackwardCFunction)
                self.splits[node] = sorted(slots[node])
                self.below[node] = below
        self.whole = whole or not self.splits or not self._separable()

    def _separable(self) -> bool:
        """No leaf is below two split nodes, so pass 2 can run each split node on its edges off
        the path alone (a leaf that a node's path reaches is below a split node under it)."""
        seen: set[int] = set()
        for leaves in self.below.values():
            ids = {id(t) for t in leaves}
            if ids & seen:
                return False
            seen |= ids
        return True


def _leaves(starts: list[Node], edges: dict[Node, list[tuple[Node, int]]]) -> list[torch.Tensor]:
    """The leaf tensors whose gradients autograd accumulates below ``starts`` (``edges``: each
    node's, from the walk)."""
    found: list[torch.Tensor] = []
    seen: set[Node] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node's leaf
        if isinstance(variable, torch.Tensor):
            found.append(variable)
        stack.extend(child for child, _ in edges[node])
    return found
