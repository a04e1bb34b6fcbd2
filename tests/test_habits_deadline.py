"""The server stops work whose caller has gone: a DeadlineExceeded does not block the next call."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from remote_autograd import ClientOptions, DeadlineExceeded, RemoteModule

LAYERS = 40


class Nap(nn.Module):
    """A layer that takes 0.25 s on a "slow" batch (first element positive), none otherwise."""

    def __init__(self, ran: list[int]) -> None:
        super().__init__()
        self.ran = ran

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.flatten()[0] > 0:
            self.ran.append(1)
            time.sleep(0.25)
        return x * 1.0


def test_an_abandoned_call_stops_and_does_not_block_the_next(start_server):
    ran: list[int] = []
    trunk = nn.Sequential(*(Nap(ran) for _ in range(LAYERS)), nn.Linear(4, 4).double())
    server = start_server(trunk)
    remote = RemoteModule(server.address, options=ClientOptions(timeout=3.0, retries=0))
    fast = -torch.ones(2, 4, dtype=torch.float64)
    slow = torch.ones(2, 4, dtype=torch.float64)
    with torch.no_grad():
        expected = remote(fast)  # connected: the deadlines below are the calls' own
        with pytest.raises(DeadlineExceeded):
            remote(slow)  # 40 layers of 0.25 s: far past the 3 s deadline
        # The client's next call gets the trunk as soon as the abandoned one stops at a layer
        # boundary; without that it would wait ~7 s behind it and time out too.
        again = remote(fast)
        torch.testing.assert_close(again, expected, rtol=0, atol=0)
        torch.testing.assert_close(again, trunk(fast), rtol=0, atol=0)
    assert 0 < len(ran) < LAYERS  # the abandoned forward stopped part way
    remote.close()
