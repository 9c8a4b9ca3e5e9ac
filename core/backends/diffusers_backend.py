"""The backend protocol on a diffusers Stable Diffusion (1.x, 2.x, XL) pipeline.

Deltas reach the UNet through forward hooks on its ``nn.Linear``/``nn.Conv2d`` modules: the hook adds
``F.linear(x, ΔW, Δb)`` (or the convolution of ``ΔW``) to the module's output while the
:class:`~concept_guard.core.delta.DeltaSet` is enabled, and returns nothing (leaving the output
untouched, bit for bit) when it is off. The base weights are never written and the UNet is never copied.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import Conditioning
from ..delta import DeltaSet, WeightDelta
from ..errors import ConceptGuardError, ModelLoadError, NoMatchingModulesError
from ..fingerprint import weights_fingerprint
from ..unet.keymap import UNetKeyMap
from ..unet.layout import detect_arch
from .diffusers_loading import PipelineParts, load_pipeline_folder, resolve_model, schedule_alphas_cumprod

logger = logging.getLogger(__name__)

_PREDICTION_TYPES = ("epsilon", "v_prediction")


def _delta_hook(delta: WeightDelta):
    """Forward hook adding the delta's contribution; returns ``None`` (output untouched) when off."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not delta.enabled:
            return None
        x = args[0]
        w = delta.delta_weight().to(x.dtype)
        b = delta.delta_bias()
        b = None if b is None else b.to(x.dtype)
        if isinstance(module, nn.Conv2d):
            extra = F.conv2d(x, w, b, module.stride, module.padding, module.dilation, module.groups)
        else:
            extra = F.linear(x, w, b)
        return output + extra.to(output.dtype)

    return hook


class DiffusersBackend:
    """:class:`~concept_guard.core.backend.DiffusionBackend` on diffusers models.

    Build it with :meth:`load` (a folder or checkpoint path) or :meth:`from_pipeline` (an existing
    ``StableDiffusionPipeline``/``StableDiffusionXLPipeline``). All models are put in eval mode with
    ``requires_grad=False``: gradients can only reach attached deltas.

    Args:
        parts (`PipelineParts`): the pipeline's models, tokenizers and scheduler config.
        prediction_type (`str`, *optional*): override the scheduler config's ``prediction_type``.
    """

    def __init__(self, parts: PipelineParts, *, prediction_type: str | None = None):
        self.unet, self.vae = parts.unet, parts.vae
        self.text_encoders, self.tokenizers = parts.text_encoders, parts.tokenizers
        self.source = parts.source
        for model in (self.unet, self.vae, *self.text_encoders):
            model.requires_grad_(False).eval()
        config = self.unet.config
        self.keymap = UNetKeyMap(config)
        self.arch = detect_arch(config)
        self._added_cond = config.get("addition_embed_type") == "text_time"
        if self._added_cond and len(self.text_encoders) != 2:
            raise ModelLoadError(
                f"SDXL UNet in {self.source!r} needs two text encoders, got {len(self.text_encoders)} "
                "(refiner-only pipelines are not supported)."
            )
        self.prediction_type = prediction_type or parts.scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in _PREDICTION_TYPES:
            raise ModelLoadError(
                f"`prediction_type` must be one of {list(_PREDICTION_TYPES)}, got {self.prediction_type!r}."
            )
        self.device = self.unet.device
        self.dtype = self.unet.dtype
        self.scheduler_config = dict(parts.scheduler_config)
        self.alphas_cumprod = schedule_alphas_cumprod(parts.scheduler_config).to(self.device)
        self.latent_channels = int(config.in_channels)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = config.sample_size
        self.native_latent_size = int(size if isinstance(size, int) else size[0]) if size else 64
        self._fingerprint: str | None = None
        self._modules: dict[str, nn.Module] | None = None
        self._hooked: set[str] = set()
        #: ``embedding:NAME`` -> tokens, filled by ``core.embeddings.add_embedding``
        self.embedding_tokens: dict[str, list[str]] = {}

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_pipeline(cls, pipe, *, prediction_type: str | None = None) -> DiffusersBackend:
        """Wrap an existing diffusers SD/SDXL pipeline (its models are shared, not copied)."""
        encoders = tuple(
            m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None
        )
        toks = tuple(t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None)
        parts = PipelineParts(
            unet=pipe.unet,
            vae=pipe.vae,
            text_encoders=encoders,
            tokenizers=toks,
            scheduler_config=dict(pipe.scheduler.config),
            source=type(pipe).__name__,
        )
        return cls(parts, prediction_type=prediction_type)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        prediction_type: str | None = None,
        tokenizer: str | Path | None = None,
    ) -> DiffusersBackend:
        """Load a pipeline folder or a single-file checkpoint, offline.

        Args:
            path: a diffusers pipeline folder, or an SD1.x/2.x/XL ``.safetensors``/``.ckpt``.
            device, dtype: where and in which dtype the models compute; with fp16, a VAE whose config asks
                for it (``force_upcast``) stays fp32, as in the diffusers pipelines.
            prediction_type: override (``"epsilon"``/``"v_prediction"``), e.g. for SD2 512-base checkpoints.
            tokenizer: for single files only, a folder with the CLIP tokenizer (see ``single_file``).

        Raises:
            ModelLoadError: missing or unreadable files (the message names them).
        """
        resolved = resolve_model(path)
        if resolved.is_dir():
            parts = load_pipeline_folder(resolved, dtype)
        else:
            from .single_file import load_single_file

            parts, detected = load_single_file(resolved, dtype, tokenizer=tokenizer)
            prediction_type = prediction_type or detected
        parts.unet.to(device)
        for enc in parts.text_encoders:
            enc.to(device)
        parts.vae.to(device)
        return cls(parts, prediction_type=prediction_type)

    # -- text, eps, VAE -----------------------------------------------------------------------

    def count_tokens(self, prompt: str) -> int:
        """Tokens of ``prompt`` without start/end tokens (CLIP fits 75)."""
        return len(self.tokenizers[0](prompt, truncation=False).input_ids) - 2

    def _token_ids(self, tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(device)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """Like the diffusers pipelines: SD1/2 the encoder's last hidden state; SDXL both encoders'
        penultimate hidden states concatenated, the pooled embedding of encoder 2, and time ids
        ``(H, W, 0, 0, H, W)`` for the native resolution."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if any("embedding:" in p for p in prompts):
            from ..embeddings import expand_embedding_syntax

            prompts = [expand_embedding_syntax(p, self.embedding_tokens) for p in prompts]
        return self._encode(prompts)

    def encode_text_with_vectors(
        self, prompts: Sequence[str], vectors: dict[str, torch.Tensor]
    ) -> Conditioning:
        """:meth:`encode_text` with ``PLACEHOLDER`` standing for ``vectors`` (see ``core.token_vectors``);
        the encoders stay frozen, gradients reach only the vectors."""
        from ..token_vectors import expand_placeholder, vector_count

        slots = self.embedding_widths()
        missing = [k for k in slots if k not in vectors]
        if missing:
            raise ConceptGuardError(
                f"This {self.arch} model needs token vectors for {list(slots)}; missing {missing}."
            )
        prompts = expand_placeholder(
            [prompts] if isinstance(prompts, str) else prompts, vector_count(vectors)
        )
        return self._encode(prompts, vectors)

    def _encode(self, prompts: list[str], vectors: dict[str, torch.Tensor] | None = None) -> Conditioning:
        from ..token_vectors import substituting

        slots = list(self.embedding_widths())
        if not self._added_cond:
            enc, tok = self.text_encoders[0], self.tokenizers[0]
            with substituting(enc, tok, None if vectors is None else vectors[slots[0]]):
                context = enc(self._token_ids(tok, prompts, enc.device))[0]
            return Conditioning(context=context.to(self.device))
        hidden, pooled = [], None
        for slot, enc, tok in zip(slots, self.text_encoders, self.tokenizers, strict=True):
            with substituting(enc, tok, None if vectors is None else vectors[slot]):
                out = enc(self._token_ids(tok, prompts, enc.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if out[0].dim() == 2:  # CLIPTextModelWithProjection: text_embeds
                pooled = out[0]
        context = torch.cat(hidden, dim=-1).to(self.device)
        pixels = self.native_latent_size * self.vae_scale_factor
        time_ids = torch.tensor(
            [[pixels, pixels, 0, 0, pixels, pixels]], dtype=context.dtype, device=self.device
        )
        return Conditioning(
            context=context, pooled=pooled.to(self.device), time_ids=time_ids.repeat(len(prompts), 1)
        )

    def embedding_widths(self) -> dict[str, int]:
        from ..backend import ENCODER_SLOTS

        return {
            slot: int(enc.get_input_embeddings().weight.shape[1])
            for slot, enc in zip(ENCODER_SLOTS, self.text_encoders, strict=False)
        }

    def word_vectors(self, word: str) -> dict[str, torch.Tensor]:
        out = {}
        for slot, enc, tok in zip(self.embedding_widths(), self.text_encoders, self.tokenizers, strict=False):
            ids = tok(word).input_ids[1:-1]
            if not ids:
                raise ConceptGuardError(f"{word!r} has no tokens; give a word such as 'object'.")
            out[slot] = enc.get_input_embeddings().weight[ids].detach().float().cpu().clone()
        return out

    def token_table(self) -> tuple[dict[str, torch.Tensor], list[int]]:
        # the tokenizer's own vocabulary only: tokens added for `embedding:` files are not words
        tables = {
            slot: enc.get_input_embeddings().weight[: tok.vocab_size].detach().float()
            for slot, enc, tok in zip(
                self.embedding_widths(), self.text_encoders, self.tokenizers, strict=False
            )
        }
        return tables, sorted({i for tok in self.tokenizers for i in tok.all_special_ids})

    def decode_tokens(self, ids: Sequence[int]) -> str:
        return self.tokenizers[0].decode(list(ids)).strip()

    def _timesteps(self, t: torch.Tensor | int, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device)
        if t.is_floating_point() or t.is_complex():
            raise ConceptGuardError(f"`t` must hold integer timesteps in [0, 999], got dtype {t.dtype}.")
        t = t.long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ConceptGuardError(
                f"`t` has {t.numel()} entries for a batch of {batch}; expected 1 or {batch}."
            )
        return t

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """ε prediction (fp32); v-prediction output is converted exactly: ε = √ᾱ·v + √(1−ᾱ)·x_t."""
        batch = x_t.shape[0]
        t = self._timesteps(t, batch)
        cond = cond.expand_to(batch).to(self.device, self.dtype)
        added = None
        if self._added_cond:
            if cond.pooled is None or cond.time_ids is None:
                raise ConceptGuardError(
                    "This SDXL UNet needs `cond.pooled` and `cond.time_ids`; use `encode_text`."
                )
            added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        x = x_t.to(self.device)
        out = self.unet(
            x.to(self.dtype), t, encoder_hidden_states=cond.context, added_cond_kwargs=added
        ).sample
        out = out.float()
        if self.prediction_type == "v_prediction":
            a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            out = a.sqrt() * out + (1 - a).sqrt() * x.float()
        return out

    @torch.no_grad()
    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] -> posterior mode × ``scaling_factor`` (fp32)."""
        x = images.to(self.vae.device, self.vae.dtype) * 2 - 1
        latents = self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor
        return latents.float().to(self.device)

    @torch.no_grad()
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images ``[B, 3, H, W]`` in [0, 1] (fp32)."""
        z = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor
        images = self.vae.decode(z).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # -- deltas -------------------------------------------------------------------------------

    def _ldm_modules(self) -> dict[str, nn.Module]:
        if self._modules is None:
            self._modules = {
                self.keymap.to_ldm(name): m
                for name, m in self.unet.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv2d))
            }
        return self._modules

    def unet_module_names(self) -> list[str]:
        return list(self._ldm_modules())

    def unet_weight(self, module_name: str) -> torch.Tensor:
        module = self._ldm_modules().get(module_name)
        if not isinstance(module, nn.Linear):
            raise NoMatchingModulesError(f"{module_name!r} is not a Linear module of this UNet.")
        return module.weight.detach().float().clone().to(self.device)

    def attach_deltas(self, module_names: Sequence[str]) -> DeltaSet:
        """Zero fp32 deltas on the named modules, applied by forward hooks (see the module docstring).

        Raises:
            NoMatchingModulesError: a name is not a Linear/Conv2d of this UNet (message lists examples).
            ConceptGuardError: a module already carries deltas of another, still attached DeltaSet.
        """
        names = list(dict.fromkeys(module_names))
        modules = self._ldm_modules()
        unknown = [n for n in names if n not in modules]
        if unknown or not names:
            sample = ", ".join(list(modules)[:4])
            raise NoMatchingModulesError(
                f"Cannot attach deltas to {unknown[:5] or names}: expected LDM names of Linear/Conv2d UNet modules "
                f"({len(modules)} here, e.g. {sample}). See `unet_module_names()`."
            )
        odd = [n for n in names if getattr(modules[n], "padding_mode", "zeros") != "zeros"]
        if odd:
            raise ConceptGuardError(
                f"Modules {odd[:5]} use a padding mode other than 'zeros'; deltas cannot follow it."
            )
        busy = sorted(self._hooked.intersection(names))
        if busy:
            raise ConceptGuardError(
                f"Modules {busy[:5]} already carry deltas; call `detach()` on the previous DeltaSet first."
            )
        deltas = {
            n: WeightDelta(
                modules[n].weight.shape,
                None if modules[n].bias is None else modules[n].bias.shape,
                self.device,
            )
            for n in names
        }
        handles = [modules[n].register_forward_hook(_delta_hook(deltas[n])) for n in names]
        self._hooked.update(names)

        def undo() -> None:
            for handle in handles:
                handle.remove()
            self._hooked.difference_update(names)

        logger.debug("attached deltas to %d UNet modules", len(names))
        return DeltaSet(deltas, on_detach=undo)

    @property
    def fingerprint(self) -> str:
        """Short hash of the UNet's base weights under LDM names (see ``core.fingerprint``)."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(
                (self.keymap.to_ldm(k), v) for k, v in self.unet.state_dict().items()
            )
        return self._fingerprint
