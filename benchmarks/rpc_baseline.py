"""The torch.distributed.rpc (TensorPipe) baseline: ``python -m benchmarks.rpc_baseline``.

Two processes: ``server`` (rank 0) and ``client`` (rank 1), which echoes a float32 tensor of each
size through ``rpc_sync`` and prints one JSON line of median seconds. TensorPipe's shared-memory
reactor busy-polls a core while the agent is up, so this baseline runs in a phase of its own,
before the other methods start, rather than interleaved with them.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed.rpc as rpc

from benchmarks.common import measure, median, reps_for


def echo(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _options(address: str, uv_only: bool) -> rpc.TensorPipeRpcBackendOptions:
    # Across network namespaces only the TCP transport is honest (shm would bypass the link).
    extra = {"_transports": ["uv"], "_channels": ["basic"]} if uv_only else {}
    return rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://{address}", rpc_timeout=600, num_worker_threads=4, **extra
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--address", required=True, help="host:port of the rendezvous (rank 0)")
    parser.add_argument("--uv-only", action="store_true")
    parser.add_argument("--ifname", help="TP_SOCKET_IFNAME: the interface TensorPipe listens on")
    parser.add_argument("--sizes", default="4096")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if args.ifname:
        os.environ["TP_SOCKET_IFNAME"] = args.ifname
    options = _options(args.address, args.uv_only)
    if args.role == "server":
        print(f"ready {args.address}", flush=True)
        rpc.init_rpc("server", rank=0, world_size=2, rpc_backend_options=options)
        rpc.shutdown()
        return
    rpc.init_rpc("client", rank=1, world_size=2, rpc_backend_options=options)
    results = {}
    for size in (int(s) for s in args.sizes.split(",")):
        payload = torch.randn(size // 4)
        seconds = median(
            measure(
                lambda p=payload: rpc.rpc_sync("server", echo, args=(p,)),
                warmup=args.warmup,
                reps=reps_for(size, args.reps),
            )
        )
        results[str(size)] = {"s": seconds, "MBps": 2 * size / seconds / 1e6}
    rpc.shutdown()
    print("result " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
