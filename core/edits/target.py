"""The UNet an edit file is applied to: its weights under LDM names, and every spelling of its module names.

Edit files name UNet modules in four ways: LDM (``input_blocks.1.1.transformer_blocks.0.attn2.to_k``, with or
without ``diffusion_model.``), diffusers (``down_blocks.0.attentions.0.…``, with or without ``unet.``, old
attention-processor files with ``.processor.``), and kohya's underscore forms of either
(``lora_unet_input_blocks_1_1_…``). :class:`TargetUNet` turns any of them into the LDM name of a module of
*this* UNet, or ``None``; the edit readers (``edit_formats``) never guess names themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import torch

from ..errors import ArchitectureMismatchError
from ..unet.keymap import UNetKeyMap, strip_ldm_prefix
from ..unet.layout import detect_arch, infer_unet_config

#: Display names of the backends' ``arch`` values.
ARCH_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
#: Cross-attention (text) width -> model family, for messages about edits made for another model.
WIDTH_FAMILIES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}

KOHYA_PREFIXES = ("lora_unet_", "lycoris_")
DIFFUSERS_PREFIXES = ("unet.base_model.model.", "base_model.model.", "unet.")


def _translate_diffusers(keymap: UNetKeyMap, name: str) -> str | None:
    """diffusers module name (also the attention-processor spelling ``attn1.processor.to_out``) -> LDM."""
    name = name.replace(".processor.", ".")
    if name.endswith(".to_out"):
        name += ".0"
    try:
        return keymap.to_ldm(name)
    except ArchitectureMismatchError:
        return None


@dataclass(frozen=True, eq=False)
class TargetUNet:
    """A loaded UNet as edit readers see it.

    Args:
        arch (`str`): ``"sd1"``, ``"sd2"`` or ``"sdxl"`` (names the model in error messages).
        keymap (`UNetKeyMap`): LDM <-> diffusers names of this UNet.
        weights (`Mapping[str, torch.Tensor]`): LDM parameter key (``<module>.weight``/``.bias``) -> base
            tensor; read, never written (full-weight files become ``file - base``).
        patchable (`frozenset[str]`, *optional*): keys that can take a delta (the diffusers backend
            hooks only Linear/Conv2d modules); ``None`` means every key.
    """

    arch: str
    keymap: UNetKeyMap
    weights: Mapping[str, torch.Tensor]
    patchable: frozenset[str] | None = None

    @classmethod
    def from_diffusers_unet(
        cls, unet: torch.nn.Module, *, arch: str | None = None, patchable: frozenset[str] | None = None
    ) -> TargetUNet:
        """Wrap a diffusers ``UNet2DConditionModel`` (its tensors are shared, not copied)."""

        keymap = UNetKeyMap.from_unet(unet)
        weights = {keymap.to_ldm(k): v.detach() for k, v in unet.state_dict().items()}
        return cls(arch=arch or detect_arch(unet.config), keymap=keymap, weights=weights, patchable=patchable)

    @classmethod
    def from_backend(cls, backend) -> TargetUNet:
        """The UNet of a :class:`~concept_guard.core.backends.diffusers_backend.DiffusersBackend`; only its
        Linear/Conv2d weights can take deltas there (forward hooks)."""
        names = backend.unet_module_names()
        patchable = frozenset(f"{n}.{part}" for n in names for part in ("weight", "bias"))
        return cls.from_diffusers_unet(backend.unet, arch=backend.arch, patchable=patchable)

    @classmethod
    def from_ldm_state_dict(cls, state: Mapping[str, torch.Tensor], *, arch: str | None = None) -> TargetUNet:
        """A UNet known only by its LDM state dict (ComfyUI's ``diffusion_model``, a checkpoint's UNet part);
        the layout is inferred from tensor shapes."""

        weights = {strip_ldm_prefix(k): v for k, v in state.items()}
        config = infer_unet_config(weights)  # type: ignore[arg-type]
        return cls(arch=arch or detect_arch(config), keymap=UNetKeyMap(config), weights=weights)

    # ----- names -------------------------------------------------------------------------------

    @cached_property
    def modules(self) -> frozenset[str]:
        """LDM names of every module that owns parameters."""
        return frozenset(k.rsplit(".", 1)[0] for k in self.weights)

    @cached_property
    def _kohya(self) -> dict[str, str]:
        """kohya underscore names (LDM and diffusers spellings) -> LDM module name."""
        table: dict[str, str] = {}
        for module in sorted(self.modules):
            table.setdefault(module.replace(".", "_"), module)
            try:
                table.setdefault(self.keymap.to_diffusers(module).replace(".", "_"), module)
            except ArchitectureMismatchError:
                continue
        return table

    def resolve_module(self, name: str) -> str | None:
        """Any spelling of a module name -> its LDM name in this UNet, or ``None`` if it has no such module."""
        for prefix in KOHYA_PREFIXES:
            if name.startswith(prefix):
                return self._kohya.get(name[len(prefix) :])
        ldm = strip_ldm_prefix(name)
        if ldm in self.modules:
            return ldm
        for prefix in DIFFUSERS_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        found = _translate_diffusers(self.keymap, name)
        return found if found in self.modules else None

    def resolve_param(self, key: str) -> str | None:
        """A full-weight key (``<module>.weight``/``.bias`` in any spelling) -> LDM key, or ``None``."""
        stem, _, kind = key.rpartition(".")
        module = self.resolve_module(stem) if stem else None
        ldm = f"{module}.{kind}" if module else None
        return ldm if ldm in self.weights else None

    def diffusers_module(self, ldm_module: str) -> str:
        return self.keymap.to_diffusers(ldm_module)

    # ----- identity ----------------------------------------------------------------------------

    @property
    def display_name(self) -> str:
        return ARCH_NAMES.get(self.arch, self.arch)

    @cached_property
    def context_width(self) -> int | None:
        """Width of the text states the cross-attention reads (768 SD1, 1024 SD2, 2048 SDXL)."""
        for key, value in self.weights.items():
            if key.endswith("attn2.to_k.weight"):
                return int(value.shape[1])
        return None
