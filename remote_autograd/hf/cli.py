"""The hf extra's command line: model flags of ``remote-autograd serve``, ``train`` and ``demo``.

The server and the trainer take the same model and LoRA flags: each builds the whole model from
them and keeps its own parts, so only activations, gradients and control messages travel.
Nothing here imports transformers at import time (the core command line imports this module to
build its parser); the imports go one way, hf -> core.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "add_commands",
    "add_model_arguments",
    "build_engine",
    "build_hf_trunk",
    "model_options",
]

log = logging.getLogger(__name__)

_DEMO_OUT = "runs/demo"
# The built-in families (remote_autograd.hf.families), listed here without importing them.
_MODEL_TYPES = "gpt2, gpt_neox, llama, mistral, qwen2, qwen3, gemma, phi3"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags both sides must agree on."""
    group = parser.add_argument_group("model and split (give the server and the trainer the same)")
    group.add_argument(
        "--model-type",
        metavar="NAME",
        help=f"a small random model of this family ({_MODEL_TYPES}) with a byte-level "
        "tokenizer, sized by --n-layer/--n-embd/--n-head/--n-positions; nothing is downloaded "
        "(train/demo default: gpt2)",
    )
    group.add_argument(
        "--model-path",
        metavar="DIR",
        help="local folder with pretrained weights, config.json and tokenizer, of any family "
        "above (its config.json's model_type decides)",
    )
    group.add_argument(
        "--trunk-layers",
        default="2:4",
        metavar="K:M",
        help="blocks K..M-1 run on the server; the bottom keeps 0..K-1, the top M.. (default 2:4)",
    )
    group.add_argument("--n-layer", type=int, default=6, help="random init: blocks")
    group.add_argument("--n-embd", type=int, default=128, help="random init: hidden size")
    group.add_argument("--n-head", type=int, default=4, help="random init: attention heads")
    group.add_argument("--n-positions", type=int, default=256, help="random init: max length")
    group.add_argument("--dropout", type=float, help="set every dropout of the model to this")
    group.add_argument("--attn-implementation", default="eager", help="eager, sdpa")
    group.add_argument("--seed", type=int, default=0, help="random weights, LoRA init, data order")
    group.add_argument("--lora-rank", type=int, default=8, help="0 trains every weight instead")
    group.add_argument("--lora-alpha", type=int, default=16)
    group.add_argument("--lora-dropout", type=float, default=0.0)
    group.add_argument(
        "--lora-targets",
        help="comma-separated module names (default: the family's, e.g. c_attn,c_proj,c_fc for "
        "GPT-2, q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj for Llama)",
    )


def model_options(args: argparse.Namespace) -> tuple[Any, Any]:
    from .lora import LoraOptions
    from .models import ModelSpec

    start, sep, end = args.trunk_layers.partition(":")
    if not sep or not start.isdigit() or not end.isdigit():
        raise SystemExit(f"--trunk-layers must look like K:M (e.g. 2:4), got {args.trunk_layers!r}")
    spec = ModelSpec(
        path=args.model_path,
        model_type=args.model_type,
        trunk_start=int(start),
        trunk_end=int(end),
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        n_positions=args.n_positions,
        dropout=args.dropout,
        attn_implementation=args.attn_implementation,
        seed=args.seed,
    )
    lora = LoraOptions(
        rank=args.lora_rank,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        target_modules=_targets(args.lora_targets),
    )
    return spec, lora


def _targets(flag: str | None) -> tuple[str, ...] | None:
    """--lora-targets as a tuple; None (the family's defaults) when not given."""
    if flag is None:
        return None
    targets = tuple(t.strip() for t in flag.split(",") if t.strip())
    if not targets:
        raise SystemExit(f"--lora-targets must name at least one module, got {flag!r}")
    return targets


def _model_argv(args: argparse.Namespace) -> list[str]:
    """The model flags of ``args`` again, for a server started from here."""
    argv = [
        f"--trunk-layers={args.trunk_layers}",
        f"--n-layer={args.n_layer}",
        f"--n-embd={args.n_embd}",
        f"--n-head={args.n_head}",
        f"--n-positions={args.n_positions}",
        f"--attn-implementation={args.attn_implementation}",
        f"--seed={args.seed}",
        f"--lora-rank={args.lora_rank}",
        f"--lora-alpha={args.lora_alpha}",
        f"--lora-dropout={args.lora_dropout}",
    ]
    if args.lora_targets is not None:
        argv.append(f"--lora-targets={args.lora_targets}")
    if args.model_path:
        argv.append(f"--model-path={args.model_path}")
    # The server must be told the family: serve has no default (train's is gpt2).
    if args.model_type or not args.model_path:
        argv.append(f"--model-type={args.model_type or 'gpt2'}")
    if args.dropout is not None:
        argv.append(f"--dropout={args.dropout}")
    return argv


def add_commands(commands: Any, serve_parser: argparse.ArgumentParser) -> None:
    """``train`` and ``demo``, and the model flags of ``serve`` (which builds the trunk with
    :func:`build_hf_trunk` when --model-type or --model-path is given)."""
    add_model_arguments(serve_parser)
    _add_adapter_arguments(serve_parser)
    serve_parser.set_defaults(build_hf_trunk=build_hf_trunk, build_engine=build_engine)
    train_parser = commands.add_parser(
        "train", help="train bottom + remote trunk + top (LoRA) on a text corpus"
    )
    demo_parser = commands.add_parser(
        "demo", help="the main job: train with defaults against a server it starts"
    )
    for parser, default_out in ((train_parser, "runs/train"), (demo_parser, _DEMO_OUT)):
        add_model_arguments(parser)
        _add_train_arguments(parser, default_out)
        parser.set_defaults(run=run_train)
    # One torch thread in each of the two processes: they take turns, and on a small or shared
    # machine spinning OpenMP threads of one slow the other down (measured on 2 busy cores: 30
    # steps in 28-34 s with 1 thread, 64-231 s with 2; on idle cores 2 threads were 20% faster).
    demo_parser.set_defaults(threads=1)
    demo_parser.add_argument(
        "--clients",
        type=int,
        default=1,
        help="this many clients at once, each training its own LoRA adapter of one trunk "
        "(the server runs --adapters per-client; one loss curve each in loss.png)",
    )


def _add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "per-client adapters (docs/adapters.md; their shape: --lora-rank/-alpha/-dropout/-targets)"
    )
    group.add_argument(
        "--adapters",
        choices=("shared", "per-client"),
        default="shared",
        help="shared: every client trains the trunk's one set of weights; per-client: the base "
        "trunk is frozen and each client identity (token, mTLS name) trains its own LoRA adapter",
    )
    group.add_argument(
        "--max-adapters", type=int, default=64, help="client adapters at most (default: 64)"
    )
    group.add_argument(
        "--max-resident-adapters",
        type=int,
        default=0,
        help="adapters on the device at once; idle ones beyond move to the CPU (0: no limit)",
    )
    group.add_argument(
        "--adapter-offload-after",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="an adapter idle this long moves to the CPU with its optimizer state (0: never)",
    )


def build_engine(module: Any, options: Any, args: argparse.Namespace) -> Any:
    """What ``serve`` serves: ``module`` itself, or with ``--adapters per-client`` an
    :class:`~remote_autograd.adapters.AdapterEngine` over it."""
    if getattr(args, "adapters", "shared") != "per-client":
        return module
    from ..adapters import AdapterEngine, AdapterOptions

    targets = _targets(args.lora_targets)
    family = getattr(module, "family", None)  # an LM's trunk: the family's defaults
    if targets is None and family is not None:
        targets = tuple(family.lora_targets)
    adapters = AdapterOptions(
        rank=args.lora_rank,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        target_modules=targets or (),
        # build_trunk's seed for the trunk's adapters: a client's adapter starts where a
        # single-tenant trunk's would
        seed=args.seed + 2,
        max_adapters=args.max_adapters,
        max_resident_adapters=args.max_resident_adapters,
        offload_after=args.adapter_offload_after,
    )
    try:
        return AdapterEngine(module, options, adapters)
    except ValueError as exc:
        raise SystemExit(f"serve --adapters per-client: {exc}") from exc


def _add_train_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--server",
        metavar="HOST:PORT",
        help="a running trunk server (default: start one on 127.0.0.1 for this run)",
    )
    group.add_argument("--steps", type=int, default=300, help="optimizer steps")
    group.add_argument("--batch-size", type=int, default=8, help="samples per micro-batch")
    group.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step")
    group.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="pipeline each micro-batch in this many pieces (client and trunk overlap)",
    )
    group.add_argument("--seq-len", type=int, default=128, help="tokens per sample, at most")
    group.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument("--warmup-steps", type=int, default=20)
    group.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    group.add_argument("--corpus", help="UTF-8 text file (default: Python's pydoc topics)")
    group.add_argument("--out-dir", default=default_out, help="metrics.json, loss.png, checkpoints")
    group.add_argument("--checkpoint-every", type=int, default=100, help="steps; 0: at the end")
    group.add_argument("--resume", metavar="PATH", help="checkpoint file or folder of them")
    group.add_argument(
        "--threads", type=int, help="torch threads here and in a server started here (demo: 1)"
    )
    group.add_argument("--token-file", help="file whose first line is the server's bearer token")
    group.add_argument("--root-cert", help="PEM CA of the server's certificate (enables TLS)")


def run_train(args: argparse.Namespace) -> None:
    import torch

    from ..errors import TrunkMismatch
    from ..options import ClientOptions
    from .checkpoint import ResumeMismatch
    from .models import build_config
    from .training import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    spec, lora = model_options(args)
    try:
        build_config(spec)  # an unknown family fails here, not in the server it would start
    except ValueError as exc:
        raise SystemExit(f"{args.command}: {exc}") from exc
    token = None
    if args.token_file:
        token = Path(args.token_file).read_text().splitlines()[0].strip()
    root = Path(args.root_cert).read_bytes() if args.root_cert else None
    started = time.perf_counter()
    if getattr(args, "clients", 1) != 1:
        _run_clients(args, spec, lora)
        return
    with contextlib.ExitStack() as stack:
        server = args.server
        if server is None:
            server = stack.enter_context(_loopback_server(args))
            print(f"trunk server started on {server} (log: {args.out_dir}/server.log)", flush=True)
        config = TrainConfig(
            server=server,
            model=spec,
            lora=lora,
            steps=args.steps,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            micro_batches=args.micro_batches,
            seq_len=args.seq_len,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps,
            max_grad_norm=args.max_grad_norm,
            corpus=args.corpus,
            seed=args.seed,
            out_dir=args.out_dir,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            progress=True,
            client=ClientOptions(token=token, root_certificates=root),
        )
        try:
            result = train(config)
        # The server was started with another model or layers; --resume of another run's.
        except (TrunkMismatch, ResumeMismatch) as exc:
            raise SystemExit(f"{args.command}: {exc}") from exc
    _print_summary(result, time.perf_counter() - started)


def _print_summary(result: Any, seconds: float) -> None:
    history = result.history
    if not history:
        print("nothing to do: the checkpoint is already at --steps")
        return
    every = max(1, len(history) // 10)
    print("step   loss   tokens/s")
    rows = history[::every]
    if rows[-1] is not history[-1]:
        rows.append(history[-1])
    for metrics in rows:
        print(f"{metrics['step']:4d}  {metrics['loss']:6.3f}  {metrics['tokens_per_s']:8.0f}")
    last = history[-1]
    window = max(1, min(10, len(history) // 5))
    early = sum(m["loss"] for m in history[:window]) / window
    late = sum(m["loss"] for m in history[-window:]) / window
    print(
        f"loss {early:.3f} -> {late:.3f} (mean of the first and last {window} steps); "
        f"sent {last['bytes_sent'] / 1e6:.1f} MB, received {last['bytes_received'] / 1e6:.1f} MB; "
        f"{seconds:.0f} s"
    )
    print(f"metrics: {result.out_dir / 'metrics.json'}, loss curve: {result.out_dir / 'loss.png'}")
    change = result.lora_change
    parts = ", ".join(f"{part} {value:.3g}" for part, value in change.items())
    if all(value > 0 for value in change.values()):
        frozen = "unchanged" if result.frozen_unchanged else "CHANGED (unexpected)"
        print(
            f"LoRA weights of bottom, trunk and top all changed (L2 norm of the change: {parts}); "
            f"frozen base weights here {frozen}"
        )
    else:
        print(f"LoRA weights did NOT all change (L2 norm of the change: {parts})")


def _run_clients(args: argparse.Namespace, spec: Any, lora: Any) -> None:
    """``demo --clients N``: one per-client adapter server, N trainers at once, each with its
    own token (so its own adapter), data order and output folder.

    Each trainer runs in a process of its own (spawned): ``train`` seeds torch's process-wide
    generator to build its model, and threads of one process drew from it at the same time,
    so each built other frozen weights than the server's trunk was built with."""
    import json
    import multiprocessing
    import secrets

    from ..options import ClientOptions
    from .training import TrainConfig

    if args.clients < 1 or args.server:
        raise SystemExit("demo --clients N needs N >= 1 and no --server (it starts its own)")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = [secrets.token_hex(16) for _ in range(args.clients)]
    token_file = out_dir / "server.tokens"
    token_file.touch(mode=0o600)
    token_file.write_text("".join(t + "\n" for t in tokens))
    extra = ["--adapters=per-client", f"--token-file={token_file}"]
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with _loopback_server(args, extra) as server:
        print(f"trunk server started on {server} with one adapter per client", flush=True)
        processes = []
        for index in range(args.clients):
            config = TrainConfig(
                server=server,
                model=spec,
                lora=lora,
                steps=args.steps,
                batch_size=args.batch_size,
                grad_accum=args.grad_accum,
                seq_len=args.seq_len,
                lr=args.lr,
                weight_decay=args.weight_decay,
                warmup_steps=args.warmup_steps,
                max_grad_norm=args.max_grad_norm,
                corpus=args.corpus,
                seed=args.seed + 1 + index,  # its own data order and dropout
                out_dir=str(out_dir / f"client-{index}"),
                checkpoint_every=args.checkpoint_every,
                client=ClientOptions(token=tokens[index]),
            )
            level = logging.getLogger().getEffectiveLevel()  # the child's logs as here
            process = context.Process(target=_train_client, args=(config, args.threads, level))
            process.start()
            processes.append(process)
        for process in processes:
            process.join()
    failed = [i for i, process in enumerate(processes) if process.exitcode != 0]
    if failed:
        raise SystemExit(f"demo --clients: client(s) {failed} failed (their error is above)")
    seconds = time.perf_counter() - started
    reports = [
        json.loads((out_dir / f"client-{i}" / "metrics.json").read_text())
        for i in range(args.clients)
    ]
    _plot_clients(out_dir, [report["steps"] for report in reports])
    for index, report in enumerate(reports):
        history, change = report["steps"], report["lora_change"]
        print(
            f"client {index}: loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}, "
            f"its trunk adapter changed by {change['trunk']:.3g} (L2)"
        )
    print(
        f"{args.clients} clients, one trunk, {seconds:.0f} s; loss curves: {out_dir / 'loss.png'}"
    )


def _train_client(config: Any, threads: int | None, level: int = logging.WARNING) -> None:
    """One trainer of ``demo --clients`` (a spawned process: its own random generator)."""
    import torch

    from .training import train

    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )

    if threads:
        torch.set_num_threads(threads)
    train(config)


def _plot_clients(out_dir: Path, histories: list[list[dict[str, float]]]) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5), layout="tight")
    axes = figure.add_subplot()
    for index, history in enumerate(histories):
        steps = [m["step"] for m in history]
        axes.plot(steps, [m["loss"] for m in history], linewidth=1, label=f"client {index}")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.set_title(f"{len(histories)} clients, each its own LoRA adapter of one trunk")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(out_dir / "loss.png", dpi=120)


@contextlib.contextmanager
def _loopback_server(args: argparse.Namespace, extra: Sequence[str] = ()) -> Iterator[str]:
    """``remote-autograd serve`` in a child process on 127.0.0.1, stopped on exit.

    A child process rather than a thread: it is exactly the two-terminal setup (the trunk is
    built from the command line, no shared Python objects), and its threads do not compete with
    the training loop for this interpreter's GIL.
    """
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "remote_autograd.cli", "serve", "--address", "127.0.0.1:0"]
    argv += [*_model_argv(args), *extra]
    log_file = (out_dir / "server.log").open("w")
    env = None
    if args.threads:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env)
    try:
        address = _wait_for_address(process, out_dir / "server.log")
        yield address
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        log_file.close()


def _wait_for_address(process: subprocess.Popen, log_path: Path) -> str:
    assert process.stdout is not None  # we asked for a pipe
    for line in process.stdout:  # the server prints one line once it listens
        if " serving " in line:
            return line.rsplit(" ", 1)[-1].strip()
    process.wait()
    raise SystemExit(
        f"the trunk server exited with code {process.returncode} before serving; see {log_path}"
    )


def build_hf_trunk(args: argparse.Namespace) -> Any:
    """The trunk ``remote-autograd serve --model-type/--model-path`` serves."""
    from .lora import LoraOptions
    from .models import build_trunk

    spec, lora = model_options(args)
    if getattr(args, "adapters", "shared") == "per-client":
        lora = LoraOptions(rank=0)  # the base trunk: each client's adapter is added per client
    try:
        trunk = build_trunk(spec, lora)
    except ValueError as exc:  # an unknown family, a split that does not fit...
        raise SystemExit(f"serve: {exc}") from exc
    trainable = sum(p.numel() for p in trunk.parameters() if p.requires_grad)
    kind = f"LoRA rank {lora.rank}" if lora.rank else "no LoRA here"
    if getattr(args, "adapters", "shared") == "per-client":
        kind = f"frozen; each client's LoRA adapter of rank {args.lora_rank} comes per client"
        trainable = 0
    log.info(
        "trunk: blocks [%d, %d) of a %s, %d trainable parameters (%s)",
        spec.trunk_start,
        spec.trunk_end,
        trunk.config.model_type,
        trainable,
        kind,
    )
    return trunk
