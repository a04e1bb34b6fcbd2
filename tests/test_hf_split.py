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
    model = _tiny_llama().eval()
    batch = padded_batch()
    with torch.no_grad():
        expected = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        bottom, trunk, top = split_causal_lm(model, *cut)
        state = bottom(batch["input_ids"], batch["attention_mask"])
        logits = top(trunk(**state), state["attention_mask"], state["position_ids"])
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def _tiny_llama():
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
    return LlamaForCausalLM._from_config(config, attn_implementation="eager")


# peft 0.x asks transformers for a name it deprecated; not ours to change
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_peft_model_splits_as_the_model_it_wraps(family: str) -> None:
    """split_causal_lm(get_peft_model(model, ...)): the parts hold peft's LoRA layers and
    compute the PeftModel (a Llama-layout one once failed: the wrapper's ``model.model`` is
    the whole LM)."""
    from peft import LoraConfig, get_peft_model

    model = build_model(ModelSpec(**TINY, dropout=0.0)) if family == "gpt2" else _tiny_llama()
    targets = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
    config = LoraConfig(r=2, target_modules=targets, fan_in_fan_out=family == "gpt2")
    peft_model = get_peft_model(model, config).eval()
    with torch.no_grad():  # LoRA's B starts at zero: make the adapters count
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(1))
    batch = padded_batch()
    with torch.no_grad():
        expected = peft_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        bottom, trunk, top = split_causal_lm(peft_model, 1, 3)
        state = bottom(batch["input_ids"], batch["attention_mask"])
        logits = top(trunk(**state), state["attention_mask"], state["position_ids"])
    assert any("lora_A" in name for name, _ in trunk.named_parameters())
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_the_bottom_takes_position_ids_for_left_padded_rows() -> None:
    """HF generate() numbers a left-padded row from its first token (attention_mask's cumsum):
    given those position ids, the parts compute what the unsplit model does with them."""
    model = build_model(ModelSpec(**TINY, dropout=0.0)).eval()
    input_ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 12, 13, 14]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).logits
        bottom, trunk, top = split_causal_lm(model, 1, 3)
        state = bottom(input_ids, attention_mask, position_ids)
        logits = top(trunk(**state), state["attention_mask"], state["position_ids"])
    assert torch.equal(state["position_ids"], position_ids)
    torch.testing.assert_close(logits[1, 2:], expected[1, 2:], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits[0], expected[0], rtol=0, atol=1e-6)


def test_a_hugging_face_base_model_serves_as_a_trunk(start_server) -> None:
    """A GPT2Model as the whole trunk: called with use_cache=False it returns its ModelOutput,
    equal to local; with its default cache the error says what to do (a DynamicCache is no
    tensor)."""
    from transformers import GPT2Config, GPT2Model

    from remote_autograd import TrunkError

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    config.eos_token_id = config.bos_token_id = 0
    model = GPT2Model(config).eval()
    remote = RemoteModule(start_server(model).address).eval()  # the trunk runs in its mode
    hidden = torch.randn(2, 5, 16)
    with pytest.raises(TrunkError, match="DynamicCache.*use_cache=False"):
        remote(inputs_embeds=hidden)
    with torch.no_grad():
        out = remote(inputs_embeds=hidden, use_cache=False, output_hidden_states=True)
        expected = model(inputs_embeds=hidden, use_cache=False, output_hidden_states=True)
    assert type(out) is type(expected)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state)
    assert len(out.hidden_states) == len(expected.hidden_states) == 3
    remote.close()
