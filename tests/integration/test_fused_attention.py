"""Training routes ComfyUI's chunked CPU attention to torch SDPA, exactly and only on its clone."""
from __future__ import annotations

import torch

from comfy.ldm.modules import attention

from loralab.sampler.attention import OVERRIDE_KEY, use_fused_attention


def _attention_output_and_grads(options: dict):
    torch.manual_seed(0)
    layer = attention.CrossAttention(query_dim=64, context_dim=32, heads=4, dim_head=16)
    with torch.no_grad():  # ComfyUI's ops skip weight init
        for param in layer.parameters():
            param.normal_(0.0, 0.2)
    x = torch.randn(2, 96, 64, requires_grad=True)
    context = torch.randn(2, 7, 32)
    out = layer(x, context=context, transformer_options=options)
    out.square().sum().backward()
    return out.detach(), x.grad.clone(), layer.to_q.weight.grad.clone()


def test_fused_attention_equals_comfyuis_fallback_in_value_and_gradient(sd15):
    fallback = _attention_output_and_grads({})
    clone = sd15[0].clone()
    assert use_fused_attention(clone), "this CPU host uses a chunked attention fallback; the override must be set"
    called = []
    override = clone.model_options["transformer_options"][OVERRIDE_KEY]

    def counting(func, *args, **kwargs):
        called.append(func.__name__)
        return override(func, *args, **kwargs)

    fused = _attention_output_and_grads({OVERRIDE_KEY: counting})
    assert called, "the override was not used by CrossAttention"
    for a, b in zip(fallback, fused):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-6 * float(a.abs().max()))


def test_override_stays_on_the_training_clone(sd15):
    clone = sd15[0].clone()
    use_fused_attention(clone)
    assert OVERRIDE_KEY in clone.model_options["transformer_options"]
    assert OVERRIDE_KEY not in sd15[0].model_options.get("transformer_options", {})


def test_an_override_the_user_set_is_kept(sd15):
    clone = sd15[0].clone()
    mine = object()
    clone.model_options.setdefault("transformer_options", {})[OVERRIDE_KEY] = mine
    assert not use_fused_attention(clone)
    assert clone.model_options["transformer_options"][OVERRIDE_KEY] is mine
