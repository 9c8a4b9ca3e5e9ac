"""LDM <-> diffusers names of UNet modules and state-dict keys (SD1.x, SD2.x, SDXL).

Edits, deltas and ComfyUI speak the original LDM layout (``input_blocks.1.1.transformer_blocks.0.attn2.to_k``);
diffusers has its own (``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``). The block numbering
depends on the UNet's shape (levels, res blocks per level, which levels have attention), so the map is built
from the diffusers UNet *config* and works for any channel/depth configuration, tiny test models included.

The map is a table of *units*: blocks whose internals carry the same names on both sides (attention
blocks, up/down-sampler convs, embeddings) or differ by a fixed sub-map (res blocks). Any key at or below a
unit translates by swapping the unit's prefix, so new parameter names inside a unit need no table entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import ArchitectureMismatchError

#: Prefixes a full LDM checkpoint (or ComfyUI's model) puts before UNet keys.
#: UNet key prefix inside a full LDM checkpoint, and inside a loaded model (ComfyUI's and our ``.diff`` files).
CHECKPOINT_UNET_PREFIX = "model.diffusion_model."
UNET_PREFIX = "diffusion_model."
LDM_UNET_PREFIXES = (CHECKPOINT_UNET_PREFIX, UNET_PREFIX)

# diffusers ResnetBlock2D -> LDM ResBlock.
_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_TO_DIFFUSERS = {v: k for k, v in _RESNET_TO_LDM.items()}

_SUPPORTED_DOWN = {"CrossAttnDownBlock2D", "DownBlock2D"}
_SUPPORTED_UP = {"CrossAttnUpBlock2D", "UpBlock2D"}
_SUPPORTED_MID = {"UNetMidBlock2DCrossAttn", None}


def strip_ldm_prefix(key: str) -> str:
    """Drop a leading ``model.diffusion_model.`` / ``diffusion_model.`` if present."""
    for prefix in LDM_UNET_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


@dataclass(frozen=True)
class _Unit:
    target: str
    resnet: bool = False


def _per_level(value: object, levels: int, name: str) -> list[int]:
    """Config entries that are an int or one value per level -> one int per level."""
    if isinstance(value, int):
        return [value] * levels
    values = list(value)  # type: ignore[arg-type]
    if len(values) != levels:
        raise ArchitectureMismatchError(
            f"UNet config `{name}` has {len(values)} entries, expected one per level ({levels})."
        )
    return [int(v) if isinstance(v, int) else len(v) for v in values]


def _check_supported(config: Mapping[str, object]) -> None:
    for key in ("down_block_types", "up_block_types"):
        if key not in config:
            raise ArchitectureMismatchError(
                f"UNet config lacks `{key}`; pass a complete diffusers UNet config (`unet.config`)."
            )
    problems = []
    if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
        problems.append("class embeddings (`class_embed_type`/`num_class_embeds`)")
    if config.get("addition_embed_type") not in (None, "text_time"):
        problems.append(f"`addition_embed_type`={config.get('addition_embed_type')!r}")
    if config.get("encoder_hid_dim_type") is not None or config.get("time_cond_proj_dim") is not None:
        problems.append("`encoder_hid_dim_type`/`time_cond_proj_dim`")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in _SUPPORTED_MID:
        problems.append(f"`mid_block_type`={config.get('mid_block_type')!r}")
    bad = set(config["down_block_types"]) - _SUPPORTED_DOWN | set(config["up_block_types"]) - _SUPPORTED_UP
    if bad:
        problems.append(f"block types {sorted(bad)}")
    if problems:
        raise ArchitectureMismatchError(
            "This UNet is not an SD1.x/SD2.x/SDXL layout: " + "; ".join(problems) + ". "
            "Concept Guard maps only the Stable Diffusion 1.x/2.x/XL UNet (text-to-image, no class conditioning)."
        )


def _down_units(config: Mapping[str, object], units: dict[str, _Unit]) -> None:
    down_types = list(config["down_block_types"])
    levels = len(down_types)
    layers = _per_level(config.get("layers_per_block", 2), levels, "layers_per_block")
    n = 1
    for i, block_type in enumerate(down_types):
        for j in range(layers[i]):
            units[f"down_blocks.{i}.resnets.{j}"] = _Unit(f"input_blocks.{n}.0", resnet=True)
            if block_type.startswith("CrossAttn"):
                units[f"down_blocks.{i}.attentions.{j}"] = _Unit(f"input_blocks.{n}.1")
            n += 1
        if i < levels - 1:  # diffusers adds a downsampler to every level but the last
            units[f"down_blocks.{i}.downsamplers.0.conv"] = _Unit(f"input_blocks.{n}.0.op")
            n += 1


def _up_units(config: Mapping[str, object], units: dict[str, _Unit]) -> None:
    up_types = list(config["up_block_types"])
    levels = len(up_types)
    layers = _per_level(config.get("layers_per_block", 2), levels, "layers_per_block")[::-1]
    n = 0
    for i, block_type in enumerate(up_types):
        for j in range(layers[i] + 1):
            units[f"up_blocks.{i}.resnets.{j}"] = _Unit(f"output_blocks.{n}.0", resnet=True)
            slot = 1
            if block_type.startswith("CrossAttn"):
                units[f"up_blocks.{i}.attentions.{j}"] = _Unit(f"output_blocks.{n}.1")
                slot = 2
            if j == layers[i] and i < levels - 1:  # the upsampler closes every level but the last
                units[f"up_blocks.{i}.upsamplers.0.conv"] = _Unit(f"output_blocks.{n}.{slot}.conv")
            n += 1


def build_unit_table(config: Mapping[str, object]) -> dict[str, _Unit]:
    """diffusers unit prefix -> LDM unit prefix for the UNet described by ``config``.

    Raises:
        ArchitectureMismatchError: the config has parts outside the SD1.x/2.x/XL layout.
    """
    _check_supported(config)
    units: dict[str, _Unit] = {
        "conv_in": _Unit("input_blocks.0.0"),
        "time_embedding.linear_1": _Unit("time_embed.0"),
        "time_embedding.linear_2": _Unit("time_embed.2"),
        "conv_norm_out": _Unit("out.0"),
        "conv_out": _Unit("out.2"),
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL's pooled-text + size conditioning
        units["add_embedding.linear_1"] = _Unit("label_emb.0.0")
        units["add_embedding.linear_2"] = _Unit("label_emb.0.2")
    _down_units(config, units)
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        units["mid_block.resnets.0"] = _Unit("middle_block.0", resnet=True)
        units["mid_block.attentions.0"] = _Unit("middle_block.1")
        units["mid_block.resnets.1"] = _Unit("middle_block.2", resnet=True)
    _up_units(config, units)
    return units


class UNetKeyMap:
    """Translate UNet module names and state-dict keys between the LDM and diffusers layouts.

    Args:
        config (`Mapping[str, object]`): a diffusers ``UNet2DConditionModel`` config (``unet.config``).

    Raises:
        ArchitectureMismatchError: the config is not an SD1.x/2.x/XL UNet.
    """

    def __init__(self, config: Mapping[str, object]):
        units = build_unit_table(config)
        self._to_ldm = units
        self._to_diffusers = {u.target: _Unit(d, u.resnet) for d, u in units.items()}

    @classmethod
    def from_unet(cls, unet: torch.nn.Module) -> UNetKeyMap:
        return cls(unet.config)  # type: ignore[arg-type]

    @staticmethod
    def _translate(name: str, table: dict[str, _Unit], resnet_sub: dict[str, str], direction: str) -> str:
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            unit = table.get(".".join(parts[:k]))
            if unit is None:
                continue
            rest = parts[k:]
            if unit.resnet and rest:
                for width in (2, 1):
                    sub = resnet_sub.get(".".join(rest[:width]))
                    if sub is not None:
                        rest = [sub, *rest[width:]]
                        break
                else:
                    raise ArchitectureMismatchError(
                        f"{name!r} is inside res block {'.'.join(parts[:k])!r} but "
                        f"{'.'.join(rest)!r} is not a res-block part; expected one of {sorted(resnet_sub)}."
                    )
            return ".".join([unit.target, *rest])
        examples = ", ".join(sorted(table)[:4])
        raise ArchitectureMismatchError(
            f"No {direction} name for {name!r}: it is not inside any block of this UNet "
            f"(known blocks look like {examples}, …). Check the name and that it belongs to this architecture."
        )

    def to_ldm(self, name: str, *, prefix: str = "") -> str:
        """diffusers module name or key -> LDM (``prefix`` e.g. ``"diffusion_model."`` is prepended)."""
        return prefix + self._translate(name, self._to_ldm, _RESNET_TO_LDM, "LDM")

    def to_diffusers(self, name: str) -> str:
        """LDM module name or key (with or without ``diffusion_model.`` prefixes) -> diffusers."""
        return self._translate(strip_ldm_prefix(name), self._to_diffusers, _RESNET_TO_DIFFUSERS, "diffusers")

    def unit_names(self) -> dict[str, str]:
        """diffusers unit prefix -> LDM unit prefix (a copy, for inspection and tests)."""
        return {d: u.target for d, u in self._to_ldm.items()}


def _fit_shape(tensor: torch.Tensor, shape: torch.Size | None) -> torch.Tensor:
    """1x1 conv <-> linear weights (LDM SD1 ``proj_in``/``proj_out`` are convs; SD2/XL and diffusers'
    ``use_linear_projection`` use linears): reshape when the element count matches."""
    if shape is None or tensor.shape == shape:
        return tensor
    if tensor.numel() == shape.numel() and {tensor.dim(), len(shape)} <= {2, 4}:
        return tensor.reshape(shape)
    raise ArchitectureMismatchError(
        f"Tensor of shape {tuple(tensor.shape)} cannot fill a parameter of shape {tuple(shape)}; "
        "the checkpoint was made for a different UNet configuration."
    )


def ldm_to_diffusers_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    keymap: UNetKeyMap,
    expected_shapes: Mapping[str, torch.Size] | None = None,
) -> dict[str, torch.Tensor]:
    """Rename an LDM UNet state dict (keys with or without ``model.diffusion_model.``) to diffusers keys.

    Keys outside the UNet (VAE, text encoders) must be filtered out by the caller. With
    ``expected_shapes`` (the target model's ``{key: shape}``), 1x1-conv and linear projection weights are
    reshaped to what the target expects.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = keymap.to_diffusers(key)
        if new in out:
            raise ArchitectureMismatchError(
                f"Two checkpoint keys map to diffusers key {new!r} (second: {key!r})."
            )
        out[new] = _fit_shape(value, None if expected_shapes is None else expected_shapes.get(new))
    return out


def diffusers_to_ldm_state_dict(
    state_dict: Mapping[str, torch.Tensor], keymap: UNetKeyMap, *, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet state dict to LDM keys (``prefix`` e.g. ``"model.diffusion_model."``)."""
    return {keymap.to_ldm(k, prefix=prefix): v for k, v in state_dict.items()}
