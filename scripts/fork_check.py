"""Split training with fork DataLoader workers beside a connected RemoteModule.

Runs ``--epochs`` epochs of a tiny float64 MLP (bottom and top here, the trunk on the server
at ``--address``), each epoch through a ``DataLoader(num_workers=--workers)`` with the default
start method (fork on Linux), the same training locally beside it, and prints one JSON line:
epochs run, workers that crashed, and the largest difference between the two models. gRPC's
own messages go to stderr, where the caller counts its fork warnings.

    python scripts/fork_check.py --address 127.0.0.1:PORT --epochs 40 --workers 2
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from remote_autograd import RemoteModule, RemoteOptimizer


def parts() -> tuple[nn.Module, nn.Module, nn.Module]:
    # The float64 MLP of tests/models.py:mlp_parts(seed=0), which the server's factory serves.
    torch.manual_seed(0)
    bottom = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
    trunk = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh())
    top = nn.Linear(12, 3)
    return bottom.double(), trunk.double(), top.double()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=4, help="batches per epoch")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(1)
    n = 8 * args.batches
    data = TensorDataset(
        torch.randn(n, 6, generator=generator, dtype=torch.float64),
        torch.randint(0, 3, (n,), generator=generator),
    )
    bottom, trunk, top = parts()
    local = nn.Sequential(*copy.deepcopy([bottom, trunk, top]))
    remote = nn.Sequential(bottom, RemoteModule(args.address), top)
    local_opt = torch.optim.SGD(local.parameters(), lr=0.05)
    client_opt = torch.optim.SGD([*bottom.parameters(), *top.parameters()], lr=0.05)
    trunk_opt = RemoteOptimizer(remote[1], torch.optim.SGD, lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    crashes, epochs, started = [], 0, time.monotonic()
    for epoch in range(args.epochs):
        loader = DataLoader(data, batch_size=8, num_workers=args.workers)
        try:
            for x, y in loader:
                for model, opts in ((local, (local_opt,)), (remote, (client_opt, trunk_opt))):
                    for opt in opts:
                        opt.zero_grad()
                    loss_fn(model(x), y).backward()
                    for opt in opts:
                        opt.step()
        except RuntimeError as exc:  # "DataLoader worker (pid ...) is killed by signal: ..."
            crashes.append(f"epoch {epoch}: {exc}")
            print(f"epoch {epoch}: {exc}", file=sys.stderr, flush=True)
            break  # the two models no longer saw the same batches
        epochs += 1
    remote_trunk = remote[1].remote_state_dict()
    pairs = [(remote_trunk[name], p) for name, p in local[1].named_parameters()]
    pairs += zip(
        [*bottom.parameters(), *top.parameters()],
        [*local[0].parameters(), *local[2].parameters()],
        strict=True,
    )
    diff = max((a - b).abs().max().item() for a, b in pairs)
    remote[1].close()
    print(
        json.dumps(
            {
                "epochs": epochs,
                "crashes": crashes,
                "max_abs_diff": diff,
                "seconds": round(time.monotonic() - started, 1),
            }
        ),
        flush=True,
    )
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
