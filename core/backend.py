"""The backend protocol: the few operations every training method needs.

One ESD or textual-inversion implementation runs on a diffusers pipeline (CLI, tests)
and on ComfyUI's MODEL/CLIP/VAE (nodes) because both sides implement this interface:

* prompts -> :class:`Conditioning` (batched; SDXL's pooled text embedding and time ids included);
* ``eps(x_t, t, cond)`` on the 1000-step DDPM schedule at integer timesteps
  (v-prediction models are converted to eps by the backend);
* VAE encode (images in [0, 1] -> scaled latents) and decode;
* trainable fp32 weight deltas attached to a named subset of UNet weights (LDM module names),
  with a teacher switch that turns them all off without copying the UNet;
* prompts in which :data:`PLACEHOLDER` stands for trainable token vectors (textual inversion), encoded
  differentiably with respect to those vectors while the text encoder itself stays frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch

from .delta import DeltaSet

#: Written in a prompt, stands for the vectors given to ``encode_text_with_vectors`` (one word, any position).
PLACEHOLDER = "<S*>"
#: A single, rare CLIP BPE token ("sks", id 48136) that backends put where the vectors go before
#: substituting them, so the tokenizer never needs new tokens (the host's tokenizer is shared).
SENTINEL_WORD = "sks"
#: Vector slots, as embedding files name them: ``clip_l`` is the only text encoder of SD1.x/2.x
#: (768 or 1024 wide); SDXL adds ``clip_g`` (1280).
ENCODER_SLOTS = ("clip_l", "clip_g")


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning for a batch of prompts.

    Args:
        context (`torch.Tensor`): cross-attention states ``[B, L, D]``.
        pooled (`torch.Tensor`, *optional*): SDXL pooled text embedding ``[B, P]``; ``None`` for SD1.x/2.x.
        time_ids (`torch.Tensor`, *optional*): SDXL size/crop conditioning ``[B, 6]``; ``None`` for SD1.x/2.x.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.context.shape[0])

    def _map(self, fn) -> Conditioning:
        return Conditioning(
            context=fn(self.context),
            pooled=None if self.pooled is None else fn(self.pooled),
            time_ids=None if self.time_ids is None else fn(self.time_ids),
        )

    def __getitem__(self, index) -> Conditioning:
        """Select rows (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda t: t[index])

    def repeat(self, n: int) -> Conditioning:
        """Repeat every row ``n`` times along the batch (``[a, b] -> [a, b, a, b, ...]``)."""
        return self._map(lambda t: t.repeat(n, *([1] * (t.dim() - 1))))

    def expand_to(self, batch: int) -> Conditioning:
        """Broadcast a single-row conditioning to ``batch`` rows."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"`cond` has {len(self)} rows; expected 1 or {batch}.")
        return self.repeat(batch)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        return replace(
            self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))
        )

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch dimension."""
        first = items[0]
        return Conditioning(
            context=torch.cat([c.context for c in items]),
            pooled=None if first.pooled is None else torch.cat([c.pooled for c in items]),
            time_ids=None if first.time_ids is None else torch.cat([c.time_ids for c in items]),
        )


#: Native latent size of each family when the model does not say (SD1.x/2.x: 512 px, SDXL: 1024 px; /8).
NATIVE_LATENT = {"sd1": 64, "sd2": 64, "sdxl": 128}


@runtime_checkable
class DiffusionBackend(Protocol):
    """What a training method may ask of a model. See the module docstring.

    Attributes:
        device (`torch.device`): where the UNet computes.
        dtype (`torch.dtype`): the UNet's compute dtype (deltas are always fp32).
        arch (`str`): ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        prediction_type (`str`): the model's native output, ``"epsilon"`` or ``"v_prediction"``.
        alphas_cumprod (`torch.Tensor`): ``[1000]`` fp32, the DDPM schedule that ``eps`` uses.
        latent_channels (`int`): channels of the UNet's latent space.
        vae_scale_factor (`int`): pixel size / latent size.
        fingerprint (`str`): a short hash identifying the base weights (written into metadata).
        native_latent_size (`int`): the latent height/width the model was trained at (e.g. 64 for SD1.5).
    """

    device: torch.device
    dtype: torch.dtype
    arch: str
    prediction_type: str
    alphas_cumprod: torch.Tensor
    latent_channels: int
    vae_scale_factor: int
    fingerprint: str
    native_latent_size: int

    def count_tokens(self, prompt: str) -> int:
        """Tokens of ``prompt`` without the start/end tokens (CLIP's context fits 75)."""
        ...

    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """Encode prompts (no grad) into a batched :class:`Conditioning` on ``device``."""
        ...

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Noise prediction ``[B, C, h, w]`` for noisy latents ``x_t`` at integer timesteps ``t`` ``[B]``.

        Differentiable with respect to attached, enabled deltas. Output is fp32.
        """
        ...

    def encode_text_with_vectors(
        self, prompts: Sequence[str], vectors: dict[str, torch.Tensor]
    ) -> Conditioning:
        """Like :meth:`encode_text`, with every :data:`PLACEHOLDER` replaced by the ``[n, d]`` rows of
        ``vectors`` (one entry per slot of :meth:`embedding_widths`); differentiable with respect to them."""
        ...

    def embedding_widths(self) -> dict[str, int]:
        """Token-embedding width per vector slot: ``{"clip_l": 768}`` (SD1), ``{"clip_l": 1024}`` (SD2),
        ``{"clip_l": 768, "clip_g": 1280}`` (SDXL)."""
        ...

    def word_vectors(self, word: str) -> dict[str, torch.Tensor]:
        """The token-embedding rows ``[k, d]`` (fp32, detached) of ``word``'s k tokens, per slot."""
        ...

    def token_table(self) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Every vocabulary token's embedding row ``[V, d]`` per slot (fp32, detached; row i of every slot is
        token id i; tokens added for embedding files are not part of it), and the ids of the special tokens (start, end, padding): what a discrete prompt search
        projects onto, and what it must not propose."""
        ...

    def decode_tokens(self, ids: Sequence[int]) -> str:
        """The text of CLIP token ids (as the tokenizer writes them back)."""
        ...

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> scaled latents (posterior mode × scaling factor)."""
        ...

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images ``[B, 3, H, W]`` in [0, 1]."""
        ...

    def unet_module_names(self) -> list[str]:
        """LDM names (e.g. ``input_blocks.1.1.transformer_blocks.0.attn2.to_k``) of every
        Linear/Conv2d in the UNet that can take a delta."""
        ...

    def unet_weight(self, module_name: str) -> torch.Tensor:
        """The weight the named Linear module computes with now (host patches included, no attached delta), as a
        detached fp32 copy ``[out, in]`` on ``device``; closed-form edits solve against it."""
        ...

    def attach_deltas(self, module_names: Sequence[str]) -> DeltaSet:
        """Attach zero-initialised fp32 deltas to the named modules' weights (and biases).

        The base weights are never modified. Call ``DeltaSet.detach()`` (or use it as a context
        manager) to remove them again.
        """
        ...
