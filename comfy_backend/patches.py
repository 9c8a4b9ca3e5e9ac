"""Edits as ComfyUI patches: a new MODEL = clone + patches (``"diff"`` or ComfyUI's LoRA adapters), the input
MODEL untouched."""

from __future__ import annotations

from collections.abc import Mapping

import comfy.model_patcher
import torch

from ..core.errors import ArchitectureMismatchError
from ..core.unet.keymap import UNET_PREFIX


def make_patched_model(
    model: comfy.model_patcher.ModelPatcher, ldm_deltas: Mapping[str, torch.Tensor], strength: float = 1.0
) -> comfy.model_patcher.ModelPatcher:
    """A new MODEL = ``model`` + ``strength`` · deltas, as ComfyUI ``"diff"`` patches (the base is untouched).

    Args:
        model: the MODEL to patch (cloned, never modified).
        ldm_deltas: LDM parameter names (``<module>.weight`` / ``<module>.bias``, as in
            ``DeltaSet.state_dict_ldm()``) or bare module names (meaning ``.weight``) -> delta.
            The tensors are used as given, not copied: do not modify them afterwards.
        strength: multiplier of every delta.

    Raises:
        ArchitectureMismatchError: a key is not in this UNet or a shape differs (nothing is applied).
    """
    shapes = {k: v.shape for k, v in model.model.diffusion_model.state_dict().items()}
    patches, problems = {}, []
    for name, delta in ldm_deltas.items():
        key = name if name.endswith((".weight", ".bias")) else f"{name}.weight"
        if key not in shapes:
            problems.append(f"{key!r} is not a UNet weight")
        elif tuple(shapes[key]) != tuple(delta.shape):
            problems.append(f"{key!r} has shape {tuple(shapes[key])}, the delta {tuple(delta.shape)}")
        else:
            patches[UNET_PREFIX + key] = ("diff", (delta.detach(),))
    if problems:
        raise ArchitectureMismatchError(
            f"The edit does not fit this model: {'; '.join(problems[:5])}"
            f"{f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''}. "
            "Use an edit made for this base model architecture."
        )
    return clone_with_patches(model, patches, strength)


def clone_with_patches(
    model: comfy.model_patcher.ModelPatcher, patches: Mapping[str, object], strength: float
) -> comfy.model_patcher.ModelPatcher:
    """``model.clone()`` + ``add_patches(patches, strength)``, checking that ComfyUI took every patch.

    Raises:
        ArchitectureMismatchError: a patch key is not a weight of this model (``add_patches`` would skip it
            silently); the input MODEL is untouched either way.
    """
    patched = model.clone()
    applied = set(patched.add_patches(dict(patches), strength))
    if len(applied) != len(patches):  # add_patches skips unknown keys silently; never let that pass
        missing = sorted(set(patches) - applied)[:5]
        raise ArchitectureMismatchError(
            f"ComfyUI did not accept the patches {missing}; the model's keys differ."
        )
    return patched
