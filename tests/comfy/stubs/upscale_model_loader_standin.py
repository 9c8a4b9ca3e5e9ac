"""Test-only stand-in for ComfyUI's UpscaleModelLoader (copied into a test base directory's custom_nodes/).

Registered only when ComfyUI's own node is missing (comfy_extras/nodes_upscale_model.py needs spandrel).
Same schema as the real node, so the frontend's model store can map models/upscale_models to it.
"""

import logging

import folder_paths

import nodes  # ComfyUI's nodes.py (loaded before any custom node)

NAME = "UpscaleModelLoader"


class UpscaleModelLoaderStandIn:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_name": (folder_paths.get_filename_list("upscale_models"),)}}

    RETURN_TYPES = ("UPSCALE_MODEL",)
    FUNCTION = "load_model"
    CATEGORY = "loaders"
    DESCRIPTION = "Test stand-in: ComfyUI's Load Upscale Model could not be imported (spandrel is missing)."

    def load_model(self, model_name):
        raise RuntimeError(
            f"UpscaleModelLoader is a test stand-in ({__file__}): spandrel is not installed, so "
            f"{model_name!r} cannot be loaded."
        )


if NAME in nodes.NODE_CLASS_MAPPINGS:
    NODE_CLASS_MAPPINGS = {}
else:
    logging.info("Concept Guard tests: registering a stand-in %s (ComfyUI's own did not import).", NAME)
    NODE_CLASS_MAPPINGS = {NAME: UpscaleModelLoaderStandIn}
    NODE_DISPLAY_NAME_MAPPINGS = {NAME: "Load Upscale Model (test stand-in)"}
