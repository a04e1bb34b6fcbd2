"""Staged sending (memory.DeviceBytes): a large tensor on a GPU crosses to the host a piece at a
time while it is sent, so the copy of one piece overlaps the sending of the previous one.

A CPU has no copy engine to overlap, so the library stages GPU tensors only; here the CPU is
made a staging device too, with small pieces, so that the same code runs through every reader
of a frame's buffers (the bulk channel, gRPC messages, gRPC streams, whole frames).
tests/test_cuda.py runs it from a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from codec_cases import FLOATS, codec_cases
from torch import nn

from remote_autograd import ClientOptions, RemoteModule, RemoteOptimizer, codec, memory

STAGE = 4096  # bytes per piece in these tests (4 MiB in the library)


@pytest.fixture
def staged_reads(monkeypatch) -> list[int]:
    """Stage CPU tensors in pieces of STAGE bytes; the sizes of the staged buffers read."""
    monkeypatch.setattr(codec, "_STAGED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(memory, "STAGE_BYTES", STAGE)
    reads: list[int] = []
    read = memory.DeviceBytes.pieces

    def counted(self):
        reads.append(len(self))
        yield from read(self)

    monkeypatch.setattr(memory.DeviceBytes, "pieces", counted)
    return reads


@pytest.mark.parametrize("quantization", codec.QUANTIZATIONS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_staged_frames_are_the_frames_encoded_whole(staged_reads, quantization, dtype):
    noise = torch.randn(5000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name, tensor, compression in codec_cases(dtype):
        value = {"x": tensor, "pair": (tensor.reshape(-1)[:3], noise)}
        encoder = codec.Encoder(compression=compression, quantization=quantization)
        whole = encoder.encode(value)
        buffers = encoder.encode_buffers(value, staged=True)
        staged = [b for b in buffers if isinstance(b, memory.DeviceBytes)]
        # Large enough and not compressed: staged (noise always is, 40000 bytes).
        assert staged, name
        assert codec.join(buffers) == whole, name
        assert codec.join(buffers) == whole, f"{name}: read twice"  # a retry resends it
        for size in (1000, STAGE, STAGE + 1, 1 << 20):
            chunks = list(codec.iter_chunks(buffers, size))
            assert b"".join(chunks) == whole, (name, size)
            assert {len(c) for c in chunks[:-1]} <= {size}, (name, size)
    assert staged_reads


def test_small_compressible_or_unstaged_tensors_cross_whole(staged_reads):
    small = torch.randn(STAGE // 8)  # one piece: nothing to overlap
    zeros = torch.zeros(10 * STAGE)  # LZ4 pays
    for value, compression in ((small, "none"), (zeros, "auto"), (torch.randn(STAGE), "lz4")):
        buffers = codec.Encoder(compression=compression).encode_buffers(value, staged=True)
        assert not any(isinstance(b, memory.DeviceBytes) for b in buffers), compression
    buffers = codec.Encoder().encode_buffers(torch.randn(STAGE))  # staged=False
    assert not any(isinstance(b, memory.DeviceBytes) for b in buffers)


def test_a_reader_that_stops_early_leaves_the_buffer_readable(staged_reads):
    tensor = torch.randn(10 * STAGE // 4)
    staged = memory.DeviceBytes(codec._flat_bytes(tensor))
    pieces = staged.pieces()
    first = bytes(next(pieces))
    pieces.close()  # the socket broke after one piece
    whole = b"".join(bytes(p) for p in staged.pieces())
    assert whole[: len(first)] == first
    assert whole == tensor.numpy().tobytes()
    assert len(staged) == len(whole) == 10 * STAGE


class _Wide(nn.Module):
    """A float64 trunk whose activations and gradients are many pieces."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


# path -> (client options, rows of 64 float64 features: the frame's size)
PATHS = {
    "bulk": ({}, 2048),  # 1 MiB: the bulk channel
    "grpc-stream": ({"bulk": False}, 4096),  # 2 MiB: a gRPC stream of 1 MiB chunks
    "grpc-unary": ({"bulk": False}, 512),  # 256 KiB: one gRPC message
}


@pytest.mark.parametrize("path", PATHS)
def test_split_training_through_staged_frames_equals_local(staged_reads, start_server, path):
    fields, rows = PATHS[path]
    torch.manual_seed(0)
    trunk = _Wide(64)
    local_trunk = copy.deepcopy(trunk)
    server = start_server(trunk)
    remote = RemoteModule(server.address, options=ClientOptions(**fields))
    trunk_opt = RemoteOptimizer(remote, torch.optim.SGD, lr=0.1, momentum=0.9)
    local_opt = torch.optim.SGD(local_trunk.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    try:
        for _ in range(3):
            x = torch.randn(rows, 64, generator=generator, dtype=torch.float64)
            target = torch.randn(rows, 64, generator=generator, dtype=torch.float64)
            xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
            trunk_opt.zero_grad()
            local_opt.zero_grad()
            losses = [
                ((model(xi) - target) ** 2).mean()
                for model, xi in zip((remote, local_trunk), xs, strict=True)
            ]
            for loss in losses:
                loss.backward()
            assert torch.equal(losses[0], losses[1])
            assert torch.equal(xs[0].grad, xs[1].grad)
            trunk_opt.step()
            local_opt.step()
        state = remote.state_dict()
        for name, value in local_trunk.state_dict().items():
            assert torch.equal(state[name], value), name
        if path == "bulk":
            assert remote.client.stats.bulk_calls > 0
    finally:
        remote.close()
    # Both sides staged every activation and gradient (the server is in this process).
    assert staged_reads.count(rows * 64 * 8) >= 4 * 3, staged_reads
