"""Diffusion models other than SD1.5, built from ComfyUI's own classes with no download.

- ``tiny_patcher("flux" | "sd3")``: a ModelPatcher like ``comfy.sd`` builds for a real checkpoint
  (BaseModel of the architecture, fp32), a few blocks wide and deep, randomly initialised, with
  LATENT and CONDITIONING inputs of the right shapes, so a training run takes a second or two.
- ``layer_names(arch)``: the module names of a full-size diffusion model ("sd15", "sdxl", "sd3",
  "flux"), built on the meta device (no memory, no init; ``meta_model`` gives the model), for
  checks of which layers a target preset picks and how files name them on the real architectures.

ComfyUI's layers skip weight init; ``init_weights`` gives them torch's defaults, N(0, 0.02) for
what torch has no default for, so the blocks' outputs and gradients are non-zero.
"""
from __future__ import annotations

from devkit.comfy_path import add_comfyui_to_sys_path

add_comfyui_to_sys_path()

import torch  # noqa: E402

# Full-size configs as comfy.model_detection reports them for the released checkpoints.
_UNET_COMMON = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, use_spatial_transformer=True,
                    legacy=False, use_checkpoint=False, use_temporal_attention=False, use_temporal_resblock=False)
FULL_SIZE = {
    "sd15": ("SD15", dict(_UNET_COMMON, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                          transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                          transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], num_heads=8,
                          num_head_channels=-1, context_dim=768, use_linear_in_transformer=False,
                          adm_in_channels=None)),
    "sdxl": ("SDXL", dict(_UNET_COMMON, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                          transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                          transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], num_head_channels=64,
                          context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816,
                          num_classes="sequential")),
    "sd3": ("SD3", dict(in_channels=16, patch_size=2, out_channels=16, depth=24, input_size=None,
                        adm_in_channels=2048, num_patches=36864, pos_embed_max_size=192,
                        pos_embed_scaling_factor=None, x_block_self_attn_layers=[],
                        context_embedder_config={"target": "torch.nn.Linear",
                                                 "params": {"in_features": 4096, "out_features": 1536}})),
    "flux": ("Flux", dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=768,
                          context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19,
                          depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, qkv_bias=True,
                          guidance_embed=True)),
}

# One or two blocks of each kind, hidden size 64: a 2-step training run takes about a second.
TINY = {
    "sd3": ("SD3", dict(in_channels=16, patch_size=2, out_channels=16, depth=2, input_size=None, adm_in_channels=32,
                        num_patches=64, pos_embed_max_size=8, pos_embed_scaling_factor=None,
                        x_block_self_attn_layers=[],
                        context_embedder_config={"target": "torch.nn.Linear",
                                                 "params": {"in_features": 48, "out_features": 128}})),
    "flux": ("Flux", dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=32,
                          context_in_dim=48, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1,
                          depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, qkv_bias=True,
                          guidance_embed=True)),
}
CONTEXT = {"sd3": (48, 32), "flux": (48, 32)}  # (text embedding width, pooled width) of TINY's inputs


def _model_config(arch: str, table: dict):
    import comfy.supported_models
    cls, config = table[arch]
    model_config = getattr(comfy.supported_models, cls)(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    return model_config


def meta_model(arch: str):
    """ComfyUI's BaseModel of the full-size ``arch``, on the meta device."""
    return _model_config(arch, FULL_SIZE).get_model({}, "", device=torch.device("meta"))


def layer_names(arch: str) -> dict[str, torch.nn.Module]:
    """Every module of the full-size diffusion model of ``arch``, by name (on the meta device)."""
    return dict(meta_model(arch).diffusion_model.named_modules())


def init_weights(module: torch.nn.Module, seed: int = 0) -> None:
    """torch's default init for standard layers (ComfyUI skips it); N(0, 0.02) for the rest and
    ones for norm scales."""
    nn = torch.nn
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))
        for m in module.modules():
            for base in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm, nn.Embedding):
                if isinstance(m, base):
                    base.reset_parameters(m)
                    break
        for name, p in module.named_parameters():
            if not torch.isfinite(p).all():
                p.fill_(1.0) if name.endswith("scale") or "norm" in name else p.normal_(0, 0.02)
        for name, b in module.named_buffers():
            if b.is_floating_point() and ("pos_embed" in name or not torch.isfinite(b).all()):
                b.normal_(0, 0.02)


def tiny_patcher(arch: str, seed: int = 0, weight_dtype: torch.dtype = torch.float32,
                 manual_cast: torch.dtype | None = None):
    """A ModelPatcher of a tiny randomly initialised ``arch`` ("flux" or "sd3") on ComfyUI's device.

    ``weight_dtype`` stores its Linear and Conv weights in another dtype, and ``manual_cast`` makes
    it compute in another, as ComfyUI loads a UNet with a weight_dtype (e.g. bf16 weights computed
    in fp32 on a CPU)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    model_config = _model_config(arch, TINY)
    model_config.set_inference_dtype(weight_dtype, manual_cast)
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    model.diffusion_model.float()
    init_weights(model.diffusion_model, seed)
    if weight_dtype != torch.float32:
        with torch.no_grad():
            for module in model.diffusion_model.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    module.weight.data = module.weight.data.to(weight_dtype)
                    if module.bias is not None:
                        module.bias.data = module.bias.data.to(weight_dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_inputs(arch: str, count: int = 2, size: int = 64, seed: int = 1) -> tuple[list[dict], list[list]]:
    """``count`` LATENTs of ``size`` px images and their CONDITIONINGs for ``tiny_patcher(arch)``."""
    g = torch.Generator().manual_seed(seed)
    width, pooled = CONTEXT[arch]
    extras = {"guidance": 3.5} if arch == "flux" else {}
    latents = [{"samples": torch.randn(1, 16, size // 8, size // 8, generator=g)} for _ in range(count)]
    positive = [[[torch.randn(1, 16, width, generator=g), {"pooled_output": torch.randn(1, pooled, generator=g),
                                                            **extras}]] for _ in range(count)]
    return latents, positive
