"""Every built-in model family splits into parts that compute the unsplit model (float64), and
LoRA training through a real trunk server equals the same training done locally; families are
registered and looked up by ``config.model_type``."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from remote_autograd import RemoteModule, RemoteOptimizer
from remote_autograd.hf import (
    FAMILIES,
    GPT2Family,
    LoraOptions,
    ModelSpec,
    build_client_parts,
    build_model,
    build_tokenizer,
    build_trunk,
    causal_lm_loss,
    get_family,
    lora_state,
    register_family,
    split_causal_lm,
)
from remote_autograd.hf.data import collate

MODEL_TYPES = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"]
TINY = {"n_layer": 3, "n_embd": 32, "n_head": 4, "n_positions": 64, "dropout": 0.0}


def tiny_spec(model_type: str) -> ModelSpec:
    return ModelSpec(model_type=model_type, trunk_start=1, trunk_end=2, **TINY)


def padded_batch() -> dict[str, torch.Tensor]:
    # Three rows of different lengths: two of them carry right padding.
    return collate([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]], pad_id=0)


def split_logits(model, cut, batch) -> torch.Tensor:
    bottom, trunk, top = split_causal_lm(model, *cut)
    state = bottom(batch["input_ids"], batch["attention_mask"])
    return top(trunk(**state), state["attention_mask"], state["position_ids"])


def test_every_listed_family_is_registered() -> None:
    assert set(MODEL_TYPES) <= set(FAMILIES)


@pytest.mark.parametrize("cut", [(1, 2), (0, 3)], ids=lambda c: f"trunk{c[0]}-{c[1]}")
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_parts_compute_the_unsplit_model_in_float64(model_type: str, cut) -> None:
    model = build_model(tiny_spec(model_type)).double().eval()
    assert model.config.model_type == model_type
    batch = padded_batch()
    with torch.no_grad():
        expected = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        logits = split_logits(model, cut, batch)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("mistral", {"sliding_window": 3}),  # every layer slides
        ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 2}),
        ("phi3", {"sliding_window": 3}),
    ],
    ids=["mistral-sliding", "qwen2-mixed-layers", "phi3-sliding"],
)
def test_sliding_window_layers_get_their_own_mask(model_type: str, overrides: dict) -> None:
    """A window shorter than the sequence: each part must build the sliding mask for the layers
    that use one (Qwen2 mixes full and sliding layers), as the unsplit model does."""

    def tiny(**extra):
        config = AutoConfig.for_model(
            model_type,
            vocab_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            pad_token_id=0,
            **extra,
        )
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager").double()

    model = tiny(**overrides).eval()
    if model_type == "qwen2":
        assert model.config.layer_types == [
            "full_attention",
            "full_attention",
            "sliding_attention",
        ]
    # Padding shorter than the window: a padded query whose whole window is padding has no key
    # to attend to, and the unsplit model itself returns NaN there.
    batch = collate([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16], [17, 18, 19, 20, 21, 22]], 0)
    with torch.no_grad():
        expected = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
        full = tiny().eval()(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
        logits = split_logits(model, (1, 2), batch)
    assert not torch.allclose(expected, full)  # the window really changed something
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_lora_training_through_a_server_equals_local_training(start_server, model_type) -> None:
    """Three AdamW steps in float64: bottom and top here, the trunk on a real server
    (RemoteModule + RemoteOptimizer), against the same three parts trained in this process.
    The adapters are the family's default LoRA targets."""
    spec = tiny_spec(model_type)
    lora = LoraOptions(rank=2, alpha=4)
    trunk = build_trunk(spec, lora).double()
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora_state(trunk)}
    assert adapted == set(get_family(model_type).lora_targets)
    server = start_server(trunk)
    batch = padded_batch()

    def run(bottom, trunk, top, optimizers) -> list[float]:
        losses = []
        for _ in range(3):
            state = bottom(batch["input_ids"], batch["attention_mask"])
            hidden = trunk(**state)
            logits = top(hidden, state["attention_mask"], state["position_ids"])
            loss = causal_lm_loss(logits, batch["labels"])
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    def client_parts():
        bottom, top = build_client_parts(spec, lora)
        bottom.double()
        top.double()
        return (
            bottom,
            top,
            [p for p in (*bottom.parameters(), *top.parameters()) if p.requires_grad],
        )

    bottom, top, params = client_parts()
    with RemoteModule(server.address) as remote:
        optimizers = [
            torch.optim.AdamW(params, lr=1e-2),
            RemoteOptimizer(remote, torch.optim.AdamW, lr=1e-2),
        ]
        remote_losses = run(bottom, remote, top, optimizers)
        remote_adapters = {n: t for n, t in remote.remote_state_dict().items() if "lora_" in n}

    ref_bottom, ref_top, ref_params = client_parts()
    ref_trunk = build_trunk(spec, lora).double()
    ref_params += [p for p in ref_trunk.parameters() if p.requires_grad]
    local_losses = run(ref_bottom, ref_trunk, ref_top, [torch.optim.AdamW(ref_params, lr=1e-2)])

    assert local_losses[-1] < local_losses[0]  # the adapters really trained
    torch.testing.assert_close(remote_losses, local_losses, rtol=1e-12, atol=0)
    local_adapters = lora_state(ref_trunk)
    assert remote_adapters.keys() == local_adapters.keys()
    for name, value in local_adapters.items():
        torch.testing.assert_close(remote_adapters[name], value, rtol=1e-12, atol=1e-12, msg=name)
    for part, ref in ((bottom, ref_bottom), (top, ref_top)):
        got, want = lora_state(part), lora_state(ref)
        assert got and all(torch.allclose(got[n], want[n], rtol=1e-12, atol=1e-12) for n in want)


def test_model_path_reads_the_family_from_config_json(tmp_path) -> None:
    saved = build_model(ModelSpec(model_type="qwen2", seed=3, **TINY))
    saved.save_pretrained(tmp_path)
    build_tokenizer(ModelSpec()).save_pretrained(tmp_path)
    loaded = build_model(ModelSpec(path=str(tmp_path)))
    assert loaded.config.model_type == "qwen2"
    for (name, want), got in zip(saved.named_parameters(), loaded.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="does not match the 'qwen2' model"):
        build_model(ModelSpec(path=str(tmp_path), model_type="llama"))


def test_unknown_model_types_are_refused_with_the_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"no model family for model_type 'bert'.*gpt2.*llama"):
        build_model(ModelSpec(model_type="bert"))


def test_register_family_replaces_only_when_asked() -> None:
    calls = []

    class CountingGPT2(GPT2Family):
        def final_norm(self, backbone):
            calls.append("final_norm")
            return super().final_norm(backbone)

    original = FAMILIES["gpt2"]
    with pytest.raises(ValueError, match="already registered for model_type 'gpt2'"):
        register_family("gpt2", CountingGPT2())
    with pytest.raises(TypeError, match="DecoderFamily instance"):
        register_family("mine", GPT2Family)  # the class, not an instance
    register_family("gpt2", CountingGPT2(), replace=True)
    try:
        split_causal_lm(build_model(tiny_spec("gpt2")), 1, 2)
    finally:
        register_family("gpt2", original, replace=True)
    assert calls == ["final_norm"]
    assert FAMILIES["gpt2"] is original


def test_the_lazy_package_exports_what_it_lists() -> None:
    """remote_autograd.hf imports its names on first use: each listed one resolves to the object
    its submodule defines, and none is shadowed by a submodule of the same name."""
    import importlib

    import remote_autograd.hf as hf

    assert sorted(hf.__all__) == sorted(hf._WHERE)
    for name in hf.__all__:
        module = importlib.import_module(f"remote_autograd.hf.{hf._WHERE[name]}")
        assert getattr(hf, name) is getattr(module, name), name
