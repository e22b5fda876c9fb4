from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import adanorm
from adanorm import AdaNorm, LayerNorm, LayerNormSimple, NoNorm, convert_norms


def _transformer():
    torch.manual_seed(0)
    return nn.Transformer(
        d_model=16,
        nhead=2,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=32,
        dropout=0.0,
        batch_first=True,
    )


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def test_converts_every_layernorm_of_torch_transformer():
    model = _transformer()
    n_ln = _count(model, nn.LayerNorm)
    assert n_ln == 2 * 2 + 2 * 3 + 2  # 2 per encoder layer, 3 per decoder layer, 2 final
    rows = convert_norms(model, "adanorm", scale=2.0)
    assert len(rows) == n_ln and all(r.action == "replaced" for r in rows)
    assert _count(model, nn.LayerNorm) == 0 and _count(model, AdaNorm) == n_ln
    assert all(m.scale == 2.0 for m in model.modules() if isinstance(m, AdaNorm))
    assert {r.name for r in rows} >= {"encoder.layers.0.norm1", "decoder.norm"}
    assert rows[0].old_type == "torch.nn.modules.normalization.LayerNorm"
    assert rows[0].new_type == "adanorm.modules.AdaNorm"
    src, tgt = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    out = model(src, tgt)
    out.sum().backward()
    assert torch.isfinite(out).all()


def test_layernorm_to_layernorm_keeps_the_function():
    model = _transformer().eval()
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    src, tgt = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    before = model(src, tgt)
    convert_norms(model, "layernorm")
    assert _count(model, LayerNorm) == 12
    torch.testing.assert_close(model(src, tgt), before)


def test_idempotent_and_dry_run():
    model = _transformer()
    dry = convert_norms(model, "layernorm-simple", dry_run=True)
    assert all(r.action == "dry-run" for r in dry) and _count(model, nn.LayerNorm) == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # identity gain/bias: nothing is dropped, no warning
        convert_norms(model, "layernorm-simple")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    again = convert_norms(model, "layernorm-simple")
    assert all(r.action == "unchanged" for r in again) and len(again) == 12
    assert model.state_dict().keys() == state.keys()


def test_keeps_shape_eps_dtype_requires_grad_training_and_hooks():
    ln = nn.LayerNorm((4, 6), eps=1e-12, dtype=torch.float64)
    ln.weight.requires_grad_(False)
    calls = []
    handle = ln.register_forward_hook(lambda mod, inp, out: calls.append(type(mod).__name__))
    pre = ln.register_forward_pre_hook(lambda mod, inp: calls.append("pre"))
    model = nn.Sequential(nn.Identity(), ln).eval()
    convert_norms(model, "layernorm")
    new = model[1]
    assert isinstance(new, LayerNorm) and new.normalized_shape == (4, 6) and new.eps == 1e-12
    assert new.weight.dtype == torch.float64 and not new.weight.requires_grad
    assert new.bias.requires_grad and not new.training
    model(torch.randn(2, 4, 6, dtype=torch.float64))
    assert calls == ["pre", "LayerNorm"]
    handle.remove()
    pre.remove()
    model(torch.randn(2, 4, 6, dtype=torch.float64))
    assert calls == ["pre", "LayerNorm"]


def test_shared_module_stays_shared():
    shared = nn.LayerNorm(8)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(nn.Linear(8, 8), shared)})
    rows = convert_norms(model, "detachnorm")
    assert len(rows) == 1
    assert model["a"][0] is model["b"][1] and isinstance(model["a"][0], adanorm.DetachNorm)


def test_include_exclude():
    model = _transformer()
    rows = convert_norms(model, "adanorm", include="encoder.*", exclude=["*.norm2", "encoder.norm"])
    names = {r.name for r in rows}
    assert names == {"encoder.layers.0.norm1", "encoder.layers.1.norm1"}
    rows = convert_norms(model, "none", include=lambda name, m: name.startswith("decoder.layers.1"))
    assert len(rows) == 3 and _count(model, NoNorm) == 3


def test_warns_when_trained_affine_is_dropped():
    model = nn.Sequential(nn.LayerNorm(8), nn.LayerNorm(8, bias=False))
    with torch.no_grad():
        model[0].bias.fill_(0.5)
    with pytest.warns(UserWarning, match=r"0 has a trained bias .* dropped"):
        convert_norms(model, "layernorm-simple")
    assert isinstance(model[0], LayerNormSimple) and isinstance(model[1], LayerNormSimple)


def test_subclass_with_own_forward_warns():
    class ChannelsFirstLayerNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    model = nn.Sequential(ChannelsFirstLayerNorm(3))
    with pytest.warns(UserWarning, match="own forward"):
        rows = convert_norms(model, "adanorm")
    assert rows[0].old_type.endswith("ChannelsFirstLayerNorm")


def test_root_norm_is_refused():
    with pytest.raises(ValueError, match="make_norm"):
        convert_norms(nn.LayerNorm(4), "adanorm")


def test_meta_device_model():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    convert_norms(model, "layernorm")
    assert model[1].weight.is_meta
    convert_norms(model, "adanorm")
    assert isinstance(model[1], AdaNorm)


# ---- issue #15 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["adanorm", "layernorm-simple", "detachnorm", "none",
                                    "layernorm:unbiased", "layernorm:no-affine", "layernorm"])
def test_converted_torch_transformer_runs_in_eval(target):
    # nn.TransformerEncoderLayer's fused inference fast path reads norm1.weight / norm1.eps and
    # computes nn.LayerNorm itself: after conversion eval must run the ordinary forward.
    kwargs = {}
    if target == "layernorm:unbiased":
        target, kwargs = "layernorm", {"std_mode": "unbiased"}
    elif target == "layernorm:no-affine":
        target, kwargs = "layernorm", {"elementwise_affine": False}
    model = _transformer()
    convert_norms(model, target, **kwargs)
    src, tgt = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    reference = model(src, tgt).detach()  # training mode, dropout 0: the ordinary forward
    model.eval()
    with torch.no_grad():
        no_grad = model(src, tgt)
    with_grad = model(src, tgt)
    with torch.inference_mode():
        inference = model(src, tgt)
    # eval without grad also lets nn.MultiheadAttention take its own fused path: rounding only.
    for out in (no_grad, with_grad, inference):
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["adanorm", "layernorm-simple"])
def test_converted_encoder_with_padding_mask_in_eval(target):
    # With a padding mask, nn.TransformerEncoder's eval path would pack a nested tensor for the
    # fused layers; after conversion it must run the ordinary layers and agree with training.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    convert_norms(encoder, target)
    src = torch.randn(2, 5, 16)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    reference = encoder(src, src_key_padding_mask=mask).detach()
    encoder.eval()
    with torch.no_grad():
        out = encoder(src, src_key_padding_mask=mask)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_layernorm_equivalent_conversion_keeps_the_fast_path():
    model = _transformer()
    convert_norms(model, "layernorm")
    assert all(layer.activation_relu_or_gelu for layer in model.encoder.layers)


@pytest.mark.parametrize(
    "source",
    [lambda: nn.LayerNorm(8, bias=False), lambda: nn.LayerNorm(8, elementwise_affine=False),
     lambda: nn.LayerNorm(8), lambda: LayerNormSimple(8), lambda: AdaNorm(8)],
    ids=["no-bias", "no-affine", "affine", "simple", "adanorm"],
)
def test_conversion_to_layernorm_keeps_the_parameter_set(source):
    model = nn.Sequential(nn.Linear(8, 8), source())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = sum(p.numel() for p in model.parameters())
    convert_norms(model, "layernorm")
    assert isinstance(model[1], LayerNorm)
    assert sum(p.numel() for p in model.parameters()) == before
    model.load_state_dict(state, strict=True)
    # Explicit arguments still win.
    convert_norms(model, "layernorm", elementwise_affine=True, bias=True)
    assert model[1].weight is not None and model[1].bias is not None


# ------------------------------------------------------------------------------------------------
# HuggingFace models built offline from a config (no hub download).
# ------------------------------------------------------------------------------------------------

transformers = pytest.importorskip(
    "transformers", reason="HuggingFace transformers is not installed (pip install transformers)"
)


def test_hf_bert_from_config():
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    n_ln = _count(model, nn.LayerNorm)
    assert n_ln == 1 + 2 * 2  # embeddings + (attention output, output) per layer
    ids = torch.randint(0, 100, (2, 7))
    before = model(input_ids=ids).last_hidden_state
    rows = convert_norms(model, "layernorm")
    assert len(rows) == n_ln and all(
        m.eps == 1e-12 for m in model.modules() if isinstance(m, LayerNorm)
    )
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, before)
    convert_norms(model, "adanorm", scale=2.0)
    assert _count(model, AdaNorm) == n_ln and _count(model, nn.LayerNorm) == 0
    out = model(input_ids=ids).last_hidden_state
    out.sum().backward()
    assert torch.isfinite(out).all()


def test_hf_gpt2_from_config():
    config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    n_ln = _count(model, nn.LayerNorm)
    assert n_ln == 2 * 2 + 1  # ln_1, ln_2 per block + ln_f
    rows = convert_norms(model, "detachnorm")
    assert len(rows) == n_ln and _count(model, adanorm.DetachNorm) == n_ln
    ids = torch.randint(0, 100, (2, 9))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
