"""LoRA Lab: train LoRA-family adapters inside ComfyUI.

ComfyUI loads this folder from custom_nodes/ and calls ``comfy_entrypoint``. Node modules are
imported lazily there, so the pack's library packages (adapters/, sampler/, dataset/, report/)
stay importable without a running ComfyUI.
"""

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    from .nodes_train import NODES
    from .report.live import register_routes
    from .sampler.run_checkpoints import register_output_loras

    register_routes()  # GET /loralab/history: the live chart's state after a page reload
    register_output_loras()  # saved LoRAs and checkpoints (output/loras) can be chosen as existing_lora

    class LoraLabExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    return LoraLabExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
