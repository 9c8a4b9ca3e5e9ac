"""Previews: ComfyUI's latent previews of the demo model show its colours, and the ESD node shows samples of
the concept on the node while it trains (ComfyUI's progress-preview mechanism), without changing the edit."""

from __future__ import annotations

import comfy.latent_formats
import comfy.utils
import latent_preview
import numpy as np
import pytest
import torch
from concept_guard.nodes.esd import EraseConceptESD
from concept_guard.nodes.shapesworld import LoadShapesWorld
from concept_guard.shapesworld import world
from PIL import Image


@pytest.fixture(scope="module")
def loaded():
    with torch.inference_mode():
        return LoadShapesWorld.execute().result


def _preview_error(factors, bias, latents, target) -> float:
    image = latent_preview.Latent2RGBPreviewer(factors, bias).decode_latent_to_preview(latents)
    return float(np.abs(np.asarray(image, dtype=np.float32) / 255 - target).mean())


def test_latent_previews_of_the_demo_model_show_its_colours(loaded):
    model, _, vae = loaded
    fmt = model.model.latent_format
    assert fmt.taesd_decoder_name is None  # SD1.5's tiny decoder would draw noise from these latents
    images, _ = world.render_prompt("a yellow star on a black background", 1, seed=5)
    with torch.inference_mode():
        latents = vae.encode(torch.from_numpy(images).float() / 255) * fmt.scale_factor
    target = world.to_tensor(images)
    target = torch.nn.functional.avg_pool2d(target, 4)[0].movedim(0, -1).numpy()
    ours = _preview_error(fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias, latents, target)
    sd15 = comfy.latent_formats.SD15()
    # a linear map is a rough preview (measured: 0.16 mean error here, SD1.5's factors 0.62)
    assert ours < 0.25 and ours < _preview_error(sd15.latent_rgb_factors, None, latents, target) / 3


def _run_esd(loaded, previews: int, vae):
    model, clip, _ = loaded
    seen = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append(preview))
    node = EraseConceptESD.PREPARE_CLASS_CLONE({"unique_id": "3"})
    settings = dict(method="auto", anchor="", eta=0.0, iterations=6, lr=0.0, seed=0, file_name="")
    settings |= dict(erase_from="a red circle", preserve="a blue square")  # a small trajectory bank
    try:
        with torch.inference_mode():
            edited, _, _ = node.execute(
                model=model, clip=clip, concepts="circle", previews=previews, vae=vae, **settings
            ).result
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    return edited, [p for p in seen if p is not None]


def test_esd_node_shows_samples_while_it_trains_and_they_do_not_change_the_edit(loaded):
    edited, shown = _run_esd(loaded, previews=3, vae=loaded[2])
    assert len(shown) == 3
    for kind, image, size in shown:
        assert kind == "JPEG" and isinstance(image, Image.Image) and image.size == (256, 256) and size > 0
    assert len({image.tobytes() for _, image, _ in shown}) > 1  # the model changes as it trains
    plain, none_shown = _run_esd(loaded, previews=0, vae=None)
    assert none_shown == []
    assert edited.patches.keys() == plain.patches.keys()
    for key, patches in edited.patches.items():
        ours, theirs = _tensors(patches), _tensors(plain.patches[key])
        assert len(ours) == len(theirs) > 0 and all(
            torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)
        ), key


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []
