"""Splitting a GPT-2: the three parts compute what the unsplit model computes, padded batches
included, and the trunk's dropout mask in Backward is the one drawn in its forward."""

from __future__ import annotations

import pytest
import torch

from remote_autograd import RemoteModule
from remote_autograd.hf import (
    LoraOptions,
    ModelSpec,
    build_model,
    build_trunk,
    causal_lm_loss,
    split_causal_lm,
)
from remote_autograd.hf.data import collate

TINY = {"n_layer": 4, "n_embd": 32, "n_head": 2, "n_positions": 64}


def padded_batch() -> dict[str, torch.Tensor]:
    # Three rows of different lengths: two of them carry right padding.
    return collate([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]], pad_id=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cut", [(1, 3), (0, 4), (2, 3)], ids=lambda c: f"trunk{c[0]}-{c[1]}")
def test_parts_compute_the_unsplit_model(attn: str, cut: tuple[int, int]) -> None:
    spec = ModelSpec(**TINY, attn_implementation=attn, dropout=0.0)
    model = build_model(spec).eval()
    batch = padded_batch()
    with torch.no_grad():
        expected = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
        bottom, trunk, top = split_causal_lm(model, *cut)
        state = bottom(batch["input_ids"], batch["attention_mask"])
        logits = top(trunk(**state), state["attention_mask"], state["position_ids"])
    torch.testing.assert_close(logits, expected.logits, rtol=0, atol=1e-6)
    reference_loss = torch.nn.functional.cross_entropy(
        expected.logits[:, :-1].reshape(-1, expected.logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=-100,
    )
    torch.testing.assert_close(causal_lm_loss(logits, batch["labels"]), reference_loss)


def test_parts_list_the_unsplit_parameters_in_order() -> None:
    model = build_model(ModelSpec(**TINY))
    parts = split_causal_lm(model, 1, 3)
    seen: dict[int, torch.nn.Parameter] = {}
    for part in parts:
        for param in part.parameters():
            seen.setdefault(id(param), param)
    assert list(seen) == [id(p) for p in model.parameters()]


@pytest.mark.parametrize("cut", [(2, 2), (3, 1), (0, 5)], ids=str)
def test_split_points_outside_the_model_are_refused(cut: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="expected 0 <= start < end <= 4"):
        split_causal_lm(build_model(ModelSpec(**TINY)), *cut)


def test_backward_reuses_the_dropout_mask_of_its_forward(start_server) -> None:
    """The GPT-2 trunk with heavy dropout: the server's output and input gradient equal a local
    run drawing the same masks (Trunk seeds them from ``dropout_seed``), although other random
    numbers are drawn between the forward and the Backward."""
    spec = ModelSpec(**TINY, trunk_start=1, trunk_end=3, dropout=0.5)
    lora = LoraOptions(rank=0)
    server = start_server(build_trunk(spec, lora))
    local = build_trunk(spec, lora).train()  # the same weights, built from the same seed
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 32)
    batch = padded_batch()
    kwargs = {"attention_mask": batch["attention_mask"], "position_ids": torch.arange(7)[None]}
    grad_out = torch.randn(3, 7, 32)

    remote = RemoteModule(server.address).train()
    x_remote = hidden.clone().requires_grad_(True)
    out_remote = remote(hidden_states=x_remote, dropout_seed=1234, **kwargs)
    torch.rand(10_000)  # a Backward that re-ran the forward unseeded would draw other masks
    out_remote.backward(grad_out)

    x_local = hidden.clone().requires_grad_(True)
    out_local = local(x_local, dropout_seed=1234, **kwargs)
    out_local.backward(grad_out)

    with torch.no_grad():
        no_dropout = local.eval()(hidden, **kwargs)
    assert not torch.equal(out_local, no_dropout)  # dropout really dropped something
    assert torch.equal(out_remote, out_local)  # the forward drew the local masks
    torch.testing.assert_close(x_remote.grad, x_local.grad, rtol=0, atol=0)
    remote.close()


def test_backward_reuses_the_server_drawn_dropout_mask(start_server) -> None:
    """Without a seed from the client the server draws the mask itself; the input gradient of
    ``y = dropout(x)`` must be ``g * mask / (1 - p)`` for the very mask that produced ``y``."""
    p = 0.5
    server = start_server(torch.nn.Dropout(p))
    torch.manual_seed(1)
    x = (torch.rand(4, 1000) + 0.5).requires_grad_(True)  # no zeros: y == 0 marks a drop
    remote = RemoteModule(server.address).train()
    y = remote(x)
    torch.rand(10_000)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    mask = (y != 0).float()
    assert 0.3 < mask.mean() < 0.7  # the forward really dropped about half
    torch.testing.assert_close(x.grad, grad_out * mask / (1 - p), rtol=0, atol=0)
    remote.close()


def test_model_path_loads_local_weights_and_tokenizer(tmp_path) -> None:
    """``--model-path``: a saved GPT-2 and its tokenizer, read with local_files_only."""
    from remote_autograd.hf import build_tokenizer

    saved = build_model(ModelSpec(**TINY, seed=5))
    saved.save_pretrained(tmp_path)
    build_tokenizer(ModelSpec()).save_pretrained(tmp_path)
    spec = ModelSpec(path=str(tmp_path), trunk_start=1, trunk_end=3, dropout=0.0)
    loaded = build_model(spec)
    assert loaded.config.resid_pdrop == 0.0
    for (name, want), got in zip(saved.named_parameters(), loaded.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert build_tokenizer(spec)("ab")["input_ids"][:2] == [100, 101]


@pytest.mark.parametrize("cut", [(1, 3), (0, 2)], ids=lambda c: f"trunk{c[0]}-{c[1]}")
def test_a_rope_model_splits_the_same_way(cut: tuple[int, int]) -> None:
    """Llama (RoPE): position ids cross the cut, each part builds its own cos/sin."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    model = LlamaForCausalLM._from_config(config, attn_implementation="eager").eval()
    batch = padded_batch()
    with torch.no_grad():
        expected = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        bottom, trunk, top = split_causal_lm(model, *cut)
        state = bottom(batch["input_ids"], batch["attention_mask"])
        logits = top(trunk(**state), state["attention_mask"], state["position_ids"])
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
