"""Three-part training of a tiny GPT-2 against a real trunk server on 127.0.0.1:0: it reproduces
monolithic training, LoRA trains exactly the adapters, and a resumed run replays exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from remote_autograd.hf import (
    LoraOptions,
    ModelSpec,
    TrainConfig,
    build_client_parts,
    build_model,
    build_tokenizer,
    build_trunk,
    lora_state,
    lr_factor,
    train,
)
from remote_autograd.hf.checkpoint import ResumeMismatch
from remote_autograd.hf.data import builtin_corpus, micro_batches, pack_samples

SPEC = ModelSpec(n_layer=4, n_embd=32, n_head=2, n_positions=64, trunk_start=1, trunk_end=3)
RUN = {"batch_size": 4, "grad_accum": 2, "seq_len": 48, "max_samples": 64, "warmup_steps": 2}


def monolithic_losses(config: TrainConfig) -> tuple[list[float], list[float], bool]:
    """The same run on the unsplit GPT2LMHeadModel with plain torch: losses, grad norms, and
    whether any micro-batch was padded."""
    model = build_model(config.model)
    tokenizer = build_tokenizer(config.model)
    samples = pack_samples(
        builtin_corpus(), tokenizer, config.seq_len, max_samples=config.max_samples
    )
    batches = micro_batches(
        samples, config.batch_size, pad_id=tokenizer.pad_token_id, seed=config.seed
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=config.warmup_steps, total=config.steps)
    )
    losses, norms, padded = [], [], False
    for _ in range(config.steps):
        step_losses = []
        for _ in range(config.grad_accum):
            batch = next(batches)
            padded |= bool((batch["attention_mask"] == 0).any())
            loss = model(**batch).loss
            (loss / config.grad_accum).backward()
            step_losses.append(loss.item())
        norms.append(
            float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm))
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(sum(step_losses) / len(step_losses))
    return losses, norms, padded


def test_split_training_reproduces_monolithic_training(start_server, tmp_path: Path) -> None:
    spec = ModelSpec(**{**SPEC.__dict__, "dropout": 0.0})
    lora = LoraOptions(rank=0)  # every weight trains, as in the monolithic run
    server = start_server(build_trunk(spec, lora))
    config = TrainConfig(
        server=server.address,
        model=spec,
        lora=lora,
        steps=5,
        lr=1e-2,
        max_grad_norm=0.5,
        out_dir=str(tmp_path),
        **RUN,
    )
    result = train(config)
    expected_losses, expected_norms, padded = monolithic_losses(config)
    assert padded
    assert max(expected_norms) > config.max_grad_norm  # clipping really scaled something
    # Not bit-for-bit: the unsplit GPT2Model routes keys and values through a KV cache, which
    # changes the memory layout of the attention matmul (last-bit differences).
    torch.testing.assert_close(
        [m["loss"] for m in result.history], expected_losses, rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        [m["grad_norm"] for m in result.history], expected_norms, rtol=1e-4, atol=0
    )


def test_lora_trains_the_adapters_of_all_three_parts_only(start_server, tmp_path: Path) -> None:
    lora = LoraOptions(rank=4, alpha=8, dropout=0.1)
    trunk = build_trunk(SPEC, lora)
    trunk_adapters = lora_state(trunk)
    server = start_server(trunk)
    config = TrainConfig(
        server=server.address, model=SPEC, lora=lora, steps=3, out_dir=str(tmp_path), **RUN
    )
    result = train(config)

    assert set(result.lora_change) == {"bottom", "trunk", "top"}
    assert all(change > 0 for change in result.lora_change.values()), result.lora_change
    assert result.frozen_unchanged
    changed = lora_state(trunk)
    assert trunk_adapters.keys() == changed.keys() and trunk_adapters
    assert all(not torch.equal(trunk_adapters[n], changed[n]) for n in changed if "lora_A" in n)
    # Frozen base weights of all three parts, against fresh builds of the same model.
    fresh_trunk = dict(build_trunk(SPEC, lora).named_parameters())
    for name, param in trunk.named_parameters():
        assert param.requires_grad == ("lora_" in name), name
        if "lora_" not in name:
            torch.testing.assert_close(param, fresh_trunk[name], rtol=0, atol=0, msg=name)
    fresh_bottom, fresh_top = build_client_parts(SPEC, lora)
    for part, fresh in ((result.bottom, fresh_bottom), (result.top, fresh_top)):
        fresh_params = dict(fresh.named_parameters())
        for name, param in part.named_parameters():
            assert param.requires_grad == ("lora_" in name), name
            if "lora_" not in name:
                torch.testing.assert_close(param, fresh_params[name], rtol=0, atol=0, msg=name)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert [m["step"] for m in report["steps"]] == [1, 2, 3]
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_resume_continues_with_the_losses_of_an_uninterrupted_run(
    start_server, tmp_path: Path
) -> None:
    # Dropout on everywhere (model and adapters): the resumed run must draw the same masks.
    spec = ModelSpec(**{**SPEC.__dict__, "dropout": 0.1})
    lora = LoraOptions(rank=4, alpha=8, dropout=0.1)
    run = {**RUN, "steps": 4, "checkpoint_every": 2, "model": spec, "lora": lora}

    whole_trunk = build_trunk(spec, lora)
    server = start_server(whole_trunk)
    whole = train(TrainConfig(server=server.address, out_dir=str(tmp_path / "a"), **run))

    # A fresh server and a fresh client: everything comes from the step-2 checkpoint.
    resumed_trunk = build_trunk(spec, lora)
    server = start_server(resumed_trunk)
    checkpoint = tmp_path / "a" / "checkpoints" / "step_000002.pt"
    resumed = train(
        TrainConfig(
            server=server.address, out_dir=str(tmp_path / "b"), resume=str(checkpoint), **run
        )
    )
    keys = ("step", "loss", "grad_norm", "lr", "tokens")
    # Steps 1-2 of the resumed history are the checkpoint's copy; 3-4 were run after it.
    assert [m["step"] for m in resumed.history] == [1, 2, 3, 4]
    assert [[m[k] for k in keys] for m in resumed.history[2:]] == [
        [m[k] for k in keys] for m in whole.history[2:]
    ]
    assert resumed.history[:2] == whole.history[:2]  # the saved copy, as saved
    for part in ("bottom", "top"):
        got = lora_state(getattr(resumed, part))
        want = lora_state(getattr(whole, part))
        assert got.keys() == want.keys() and want, part
        assert all(torch.equal(got[n], want[n]) for n in want), part
    # The trunk: both servers' adapters, after the same four steps, and moved by steps 3-4.
    got, want = lora_state(resumed_trunk), lora_state(whole_trunk)
    assert got.keys() == want.keys() and want
    assert all(torch.equal(got[n], want[n]) for n in want)
    at_checkpoint = torch.load(checkpoint, weights_only=True)["trunk"]
    assert any(not torch.equal(at_checkpoint[n], want[n]) for n in at_checkpoint)


def test_resume_refuses_a_checkpoint_of_another_model(start_server, tmp_path: Path) -> None:
    lora = LoraOptions(rank=4)
    server = start_server(build_trunk(SPEC, lora))
    run = {**RUN, "steps": 1, "lora": lora}
    train(TrainConfig(server=server.address, model=SPEC, out_dir=str(tmp_path), **run))
    other = ModelSpec(**{**SPEC.__dict__, "seed": 1})
    with pytest.raises(ResumeMismatch, match="resume with the same options"):
        train(
            TrainConfig(
                server=server.address,
                model=other,
                out_dir=str(tmp_path / "b"),
                resume=str(tmp_path / "checkpoints"),
                **run,
            )
        )
    # No model type and no folder is GPT-2: a resume naming it (docs/tutorial.md's command
    # with --model-type gpt2, or without after a run with it) is the same model.
    named = ModelSpec(**{**SPEC.__dict__, "model_type": "gpt2"})
    resumed = train(
        TrainConfig(
            server=server.address,
            model=named,
            out_dir=str(tmp_path / "c"),
            resume=str(tmp_path / "checkpoints"),
            **{**run, "steps": 2},
        )
    )
    assert [m["step"] for m in resumed.history] == [1, 2]


def test_a_sequence_longer_than_the_models_positions_is_refused_by_name(tmp_path) -> None:
    """seq_len 128 on a model of 64 positions: said before anything starts (it was an
    IndexError from inside the embedding)."""
    config = TrainConfig(server="127.0.0.1:1", model=SPEC, out_dir=str(tmp_path), seq_len=128)
    with pytest.raises(ValueError, match="seq_len=128 is longer than the model's 64 positions"):
        train(config)


def test_train_command_starts_its_own_server(tmp_path: Path, capsys) -> None:
    """``remote-autograd train`` without --server: a real `serve` child process on loopback,
    built from the same command-line flags."""
    from remote_autograd.cli import main

    tiny = ["--n-layer=4", "--n-embd=32", "--n-head=2", "--n-positions=64", "--trunk-layers=1:3"]
    run = ["--steps=2", "--batch-size=2", "--grad-accum=1", "--seq-len=32", "--lora-rank=2"]
    main(["train", *tiny, *run, f"--out-dir={tmp_path}", "--threads=1"])
    out = capsys.readouterr().out
    assert "trunk server started on 127.0.0.1:" in out
    assert "LoRA weights of bottom, trunk and top all changed" in out
    assert "frozen base weights here unchanged" in out
    assert (tmp_path / "checkpoints" / "step_000002.pt").exists()
    assert len(json.loads((tmp_path / "metrics.json").read_text())["steps"]) == 2


def test_resume_with_more_steps_keeps_the_original_lr_schedule(
    start_server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = {**RUN, "steps": 2, "warmup_steps": 1, "max_samples": 16, "grad_accum": 1}
    server = start_server(build_trunk(SPEC, LoraOptions()))
    train(TrainConfig(server=server.address, model=SPEC, out_dir=str(tmp_path / "a"), **run))
    server = start_server(build_trunk(SPEC, LoraOptions()))
    checkpoint = tmp_path / "a" / "checkpoints" / "step_000002.pt"
    with caplog.at_level("WARNING", logger="remote_autograd.hf.checkpoint"):
        resumed = train(
            TrainConfig(
                server=server.address,
                model=SPEC,
                out_dir=str(tmp_path / "b"),
                resume=str(checkpoint),
                **{**run, "steps": 4},
            )
        )
    assert "keeping the original schedule" in caplog.text
    lr = TrainConfig.lr
    # Steps 3 and 4 run past the original end (2 steps): the floor, not a cosine stretched
    # to 4 steps (step 4's lr would be 0.325 * lr; step 3's comes from the checkpoint).
    assert [m["step"] for m in resumed.history] == [1, 2, 3, 4]
    for m in resumed.history[2:]:
        assert m["lr"] == pytest.approx(lr * lr_factor(m["step"] - 1, warmup=1, total=2))
        assert m["lr"] == pytest.approx(0.1 * lr)
