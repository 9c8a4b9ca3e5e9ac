"""The backend protocol (``core.backend.DiffusionBackend``) on ComfyUI's MODEL / CLIP / VAE.

The UNet is the host's own: nothing is copied. Deltas are weight wrappers on a private
``model.clone()`` (clones share one ``nn.Module``, so the caller's MODEL only ever sees the base
weights and its own patches), and the frozen teacher is that same module with the DeltaSet switched
off. ``eps`` goes through ``BaseModel.apply_model``, the entry point ComfyUI's own samplers call, so
LoRA patches, ``manual_cast_dtype``, object patches such as ModelSamplingDiscrete and
transformer-option patches all apply, and ComfyUI's own model_sampling handles v-prediction.
Training runs inside :meth:`ComfyBackend.training`, which deals with the host's inference mode and
CLIP layer (see ``autograd.py``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import torch

from ..core.backend import NATIVE_LATENT, Conditioning
from ..core.delta import DeltaSet, WeightDelta
from ..core.errors import ArchitectureMismatchError, ConceptGuardError, ModelLoadError, NoMatchingModulesError
from ..core.unet.keymap import UNET_PREFIX
from . import memory as comfy_memory
from . import text as comfy_text
from .autograd import autograd_safe_clip, frozen_trainable_copies, grad_enabled
from .model_info import detect_arch, prediction_type, unet_fingerprint

logger = logging.getLogger(__name__)


class _DeltaWrapper:
    """A ComfyUI weight wrapper (``ModelPatcher.add_weight_wrapper``) that adds one delta.

    ``comfy.ops.cast_bias_weight`` calls it with a fresh copy of the weight on every forward pass;
    the DeltaSet's switch makes it the identity (teacher).
    """

    def __init__(self, delta: WeightDelta, part: str):
        self.delta = delta
        self.part = part

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.part == "weight":
            return self.delta.apply_to_weight(tensor)
        return self.delta.apply_to_bias(tensor)

    def move_to(self, device: torch.device | None = None) -> int:
        """Called by ModelPatcher on load; returns the bytes it holds (ComfyUI's memory accounting)."""
        if device is not None:
            self.delta.to(device)
        p = self.delta.weight if self.part == "weight" else self.delta.bias
        return p.numel() * p.element_size()


def _as_training_tensor(t: torch.Tensor) -> torch.Tensor:
    """An ordinary (non-inference) tensor with the same values, usable by autograd."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


def _repeat_to(t: torch.Tensor, length: int) -> torch.Tensor:
    return t.repeat(1, length // t.shape[1], 1)


class ComfyBackend:
    """``DiffusionBackend`` on ComfyUI objects.

    Args:
        model (`ModelPatcher`): ComfyUI MODEL (SD1.x, SD2.x incl. v-prediction, SDXL). Never modified.
        clip (`comfy.sd.CLIP`, *optional*): needed by :meth:`encode_text` and :meth:`count_tokens`.
        vae (`comfy.sd.VAE`, *optional*): needed by :meth:`vae_encode` / :meth:`vae_decode`.
        teacher_budget (`float`, *optional*): activation bytes (ComfyUI's estimate) that one no-grad
            :meth:`eps` call may use; larger batches are split. Default: ``comfy_memory.teacher_budget``.

    Raises:
        ModelLoadError: the model is not an SD1.x/2.x/SDXL UNet on the discrete 1000-step schedule.
    """

    def __init__(
        self,
        model: comfy.model_patcher.ModelPatcher,
        clip=None,
        vae=None,
        *,
        teacher_budget: float | None = None,
    ):
        self.patcher = model.clone()  # ours alone: deltas are attached here, never on `model`
        unet = model.model.diffusion_model
        self.teacher_budget = comfy_memory.teacher_budget(unet) if teacher_budget is None else teacher_budget
        self.clip = clip
        self.vae = vae
        base = self.patcher.model
        self.arch = detect_arch(base)
        # Stock configs do not say the training size: the family's, unless the model says (ShapesWorld does).
        self.native_latent_size = getattr(base.model_config, "native_latent_size", NATIVE_LATENT[self.arch])
        self.prediction_type = prediction_type(self._model_sampling())
        self.device = torch.device(self.patcher.load_device)
        self.dtype = base.manual_cast_dtype or base.get_dtype()
        self.latent_channels = int(base.latent_format.latent_channels)
        ratio = getattr(vae, "downscale_ratio", 8)
        self.vae_scale_factor = ratio if isinstance(ratio, int) else 8
        self._fingerprint: str | None = None
        self._training_depth = 0
        if clip is not None:
            comfy_text.check_clip_width(clip, self.arch, base.model_config.unet_config.get("context_dim"))

    # ----- schedule and identity -------------------------------------------------------------

    def _model_sampling(self):
        return self.patcher.get_model_object("model_sampling")

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """``[1000]`` fp32 on CPU, from the (possibly object-patched) model_sampling's sigmas."""
        with torch.inference_mode(False):
            sigmas = self._model_sampling().sigmas.detach().float().cpu()
            return 1.0 / (1.0 + sigmas**2)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = unet_fingerprint(self.patcher)
        return self._fingerprint

    # ----- loading and the training session --------------------------------------------------

    def _load(self) -> None:
        """Make our clone the loaded one (with its wrappers and patches), unless it already is."""
        p = self.patcher
        loaded = any(m is p for m in comfy.model_management.loaded_models())
        if loaded and p.model.current_weight_patches_uuid == p.patches_uuid:
            return
        comfy.model_management.load_models_gpu([p], force_full_load=True)

    @contextlib.contextmanager
    def training(
        self, *, text_encoder_grad: bool = False, checkpointing: bool = False
    ) -> Iterator[ComfyBackend]:
        """Session in which gradients can flow to deltas (or, with ``text_encoder_grad``, through CLIP).

        Leaves ComfyUI's inference mode, loads our clone fully, swaps inference-tensor weights for
        same-valued ordinary copies and freezes them (trap 1), patches CLIP's in-place layer (trap 2) and,
        with ``checkpointing``, recomputes UNet blocks in backward. All undone on exit, errors included.
        """
        with contextlib.ExitStack() as stack:
            stack.enter_context(grad_enabled())
            self._training_depth += 1
            stack.callback(self._leave_training)
            self._load()
            stack.enter_context(frozen_trainable_copies(self.patcher.model))
            if checkpointing:
                stack.enter_context(comfy_memory.gradient_checkpointing(self.patcher.model.diffusion_model))
            if self.clip is not None:
                stack.enter_context(autograd_safe_clip())
                if text_encoder_grad:
                    self.clip.load_model()
                    stack.enter_context(frozen_trainable_copies(self.clip.cond_stage_model))
            yield self

    def _leave_training(self) -> None:
        self._training_depth -= 1

    # ----- the protocol -----------------------------------------------------------------------

    def unet_module_names(self) -> list[str]:
        return list(self._delta_modules())

    def _delta_modules(self) -> dict[str, torch.nn.Module]:
        """LDM name -> Linear/Conv2d module that ComfyUI can wrap (has ``weight_function``)."""
        return {
            name: m
            for name, m in self.patcher.model.diffusion_model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and hasattr(m, "weight_function")
        }

    def unet_weight(self, module_name: str) -> torch.Tensor:
        """Read by probing the module with the identity, so that every patch ComfyUI applies on load or on the
        fly (LoRAs, earlier edits, low-VRAM casts) is in the result exactly as the forward pass sees it."""
        module = self._delta_modules().get(module_name)
        if not isinstance(module, torch.nn.Linear):
            raise NoMatchingModulesError(f"{module_name!r} is not a Linear module of this UNet.")
        self._load()
        with torch.no_grad():
            eye = torch.eye(module.in_features, device=self.device, dtype=self.dtype)
            out = module(eye).float()
            if module.bias is not None:
                out = out - module(torch.zeros_like(eye[:1])).float()
        return out.t().contiguous()

    def attach_deltas(self, module_names: Sequence[str]) -> DeltaSet:
        modules = self._delta_modules()
        unknown = [n for n in module_names if n not in modules]
        if not module_names or unknown:
            raise NoMatchingModulesError(
                f"Cannot attach deltas to {unknown or list(module_names)!r}: expected LDM names of the UNet's "
                f"Linear/Conv2d modules, e.g. {list(modules)[:3]!r}. Select names from unet_module_names()."
            )
        deltas: dict[str, WeightDelta] = {}
        wrappers: list[_DeltaWrapper] = []
        for name in module_names:
            m = modules[name]
            bias_shape = m.bias.shape if m.bias is not None else None
            delta = WeightDelta(m.weight.shape, bias_shape, self.device)
            deltas[name] = delta
            parts = ("weight", "bias") if bias_shape is not None else ("weight",)
            for part in parts:
                wrapper = _DeltaWrapper(delta, part)
                self.patcher.add_weight_wrapper(f"{UNET_PREFIX}{name}.{part}", wrapper)
                wrappers.append(wrapper)
        if self._training_depth:
            self._load()
        logger.debug("attached %d deltas (%d wrappers)", len(deltas), len(wrappers))
        return DeltaSet(deltas, on_detach=lambda: self._remove_wrappers(wrappers))

    def _remove_wrappers(self, wrappers: list[_DeltaWrapper]) -> None:
        ours = {id(w) for w in wrappers}
        patches = self.patcher.weight_wrapper_patches
        for key in list(patches):
            kept = [f for f in patches[key] if id(f) not in ours]
            if kept:
                patches[key] = kept
            else:
                del patches[key]
        for m in self.patcher.model.diffusion_model.modules():
            for attr in ("weight_function", "bias_function"):
                functions = m.__dict__.get(attr)  # instance lists only; the class default is shared
                if functions:
                    m.__dict__[attr] = [f for f in functions if id(f) not in ours]

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """DDPM noise prediction via ``apply_model`` with k-diffusion scaling (route A).

        Differentiable with respect to enabled deltas only inside :meth:`training`; elsewhere it runs
        without grad (inference-tensor weights). No-grad calls run in row chunks within ``teacher_budget``.
        """
        if self._training_depth and torch.is_grad_enabled():
            return self._eps(x_t, t, cond)
        with torch.no_grad():
            rows = comfy_memory.rows_per_call(self.patcher.model, x_t.shape, self.teacher_budget)
            return comfy_memory.in_row_chunks(self._eps, x_t, t, cond, rows)

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        self._load()
        base = self.patcher.model
        ms = base.model_sampling
        x = _as_training_tensor(x_t).to(self.device, torch.float32)
        batch = x.shape[0]
        sigma = ms.sigmas[t.to(ms.sigmas.device).long()].to(self.device, torch.float32)
        sigma = _as_training_tensor(sigma)
        s = sigma.view(-1, *([1] * (x.dim() - 1)))
        x_k = x * (1.0 + s**2).sqrt()
        cond = cond.expand_to(batch).to(self.device)
        extra = {"y": self._adm(cond, x)} if self.arch == "sdxl" else {}
        x0 = base.apply_model(
            x_k,
            sigma,
            c_crossattn=_as_training_tensor(cond.context),
            transformer_options=self._transformer_options(sigma),
            **extra,
        )
        return ((x_k - x0) / s).float()

    def _transformer_options(self, sigma: torch.Tensor) -> dict:
        """What ComfyUI's sampler would pass: the MODEL's patches and wrappers, plus the sigmas."""
        options = comfy.patcher_extension.copy_nested_dicts(
            self.patcher.model_options.get("transformer_options", {})
        )
        comfy.patcher_extension.merge_nested_dicts(
            options.setdefault("wrappers", {}), self.patcher.wrappers, copy_dict1=False
        )
        options["sigmas"] = sigma
        options["cond_or_uncond"] = [0]
        return options

    def _adm(self, cond: Conditioning, x: torch.Tensor) -> torch.Tensor:
        """SDXL's vector conditioning from pooled text and size/crop ids (default: ComfyUI's, from x)."""
        if cond.pooled is None:
            raise ArchitectureMismatchError(
                "SDXL needs a pooled text embedding; encode prompts with this backend's CLIP."
            )
        rows = []
        for i in range(len(cond)):
            if cond.time_ids is not None:
                h, w, top, left, th, tw = (float(v) for v in cond.time_ids[i])
            else:  # as ComfyUI's samplers do when CLIPTextEncodeSDXL sizes are not given
                h, w = float(x.shape[-2] * 8), float(x.shape[-1] * 8)
                top, left, th, tw = 0.0, 0.0, h, w
            rows.append(
                self.patcher.model.encode_adm(
                    pooled_output=cond.pooled[i : i + 1],
                    width=w,
                    height=h,
                    crop_w=left,
                    crop_h=top,
                    target_width=tw,
                    target_height=th,
                    device=self.device,
                )
            )
        return _as_training_tensor(torch.cat(rows).to(self.device))

    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """Encode prompts with the host's CLIP (no grad). Chunks of different length are repeated
        to a common length, as ComfyUI does when it batches conds."""
        clip = self._need("clip", self.clip)
        if isinstance(prompts, str) or not prompts:
            raise ConceptGuardError(f"`prompts` must be a non-empty list of strings, got {prompts!r}.")
        contexts, pooled = [], []
        with torch.no_grad():
            for prompt in prompts:
                c, p = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
                contexts.append(c)
                pooled.append(p)
        with torch.inference_mode(False):  # ordinary tensors, usable by autograd later
            length = math.lcm(*(c.shape[1] for c in contexts))
            context = torch.cat([_repeat_to(c, length) for c in contexts]).to(self.device)
            pooled_out = torch.cat(pooled).to(self.device) if self.arch == "sdxl" else None
        return Conditioning(context=context, pooled=pooled_out)

    def encode_text_with_vectors(
        self, prompts: Sequence[str], vectors: dict[str, torch.Tensor]
    ) -> Conditioning:
        """:meth:`encode_text` with ``PLACEHOLDER`` standing for ``vectors`` (rows inserted as ComfyUI inserts
        ``embedding:NAME`` rows). Differentiable inside ``training(text_encoder_grad=True)``."""
        clip = self._need("clip", self.clip)
        grad = contextlib.nullcontext() if self._training_depth else torch.no_grad()
        contexts, pooled = [], []
        with grad:
            for tokens in comfy_text.tokens_with_vectors(clip, list(prompts), vectors):
                c, p = clip.encode_from_tokens(tokens, return_pooled=True)
                contexts.append(c)
                pooled.append(p)
        with torch.inference_mode(False):
            length = math.lcm(*(c.shape[1] for c in contexts))
            context = torch.cat([_repeat_to(c, length) for c in contexts]).to(self.device)
            pooled_out = torch.cat(pooled).to(self.device) if self.arch == "sdxl" else None
        return Conditioning(context=context, pooled=pooled_out)

    def embedding_widths(self) -> dict[str, int]:
        return comfy_text.embedding_widths(self._need("clip", self.clip))

    def word_vectors(self, word: str) -> dict[str, torch.Tensor]:
        return comfy_text.word_vectors(self._need("clip", self.clip), word)

    def token_table(self) -> tuple[dict[str, torch.Tensor], list[int]]:
        return comfy_text.token_table(self._need("clip", self.clip))

    def decode_tokens(self, ids: Sequence[int]) -> str:
        return comfy_text.decode_tokens(self._need("clip", self.clip), list(ids))

    def count_tokens(self, prompt: str) -> int:
        """Tokens ``prompt`` occupies between CLIP's start and end tokens (ComfyUI's tokenizer)."""
        clip = self._need("clip", self.clip)
        tokens = clip.tokenize(prompt)
        key = next(iter(tokens))
        sub = getattr(clip.tokenizer, getattr(clip.tokenizer, "clip", f"clip_{key}"))
        # Embedding rows come as tensors; count them as tokens but never compare them to ids.
        chunks = [[tok if isinstance(tok, int) else -1 for tok, *_ in chunk] for chunk in tokens[key]]
        last = chunks[-1]
        end = last.index(sub.end_token, 1) if sub.end_token in last[1:] else len(last)
        return (len(chunks) - 1) * (sub.max_length - 2) + end - 1

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> scaled latents (ComfyUI IMAGE is ``[B, H, W, C]``)."""
        vae = self._need("vae", self.vae)
        with torch.no_grad():
            raw = vae.encode(images.movedim(1, -1).float())
        with torch.inference_mode(False):
            return self.patcher.model.process_latent_in(raw.to(self.device, torch.float32).clone())

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self._need("vae", self.vae)
        with torch.no_grad():
            images = vae.decode(self.patcher.model.process_latent_out(latents.float()))
        with torch.inference_mode(False):
            return images.movedim(-1, 1).to(self.device, torch.float32).clamp(0, 1)

    @staticmethod
    def _need(what: str, obj):
        if obj is None:
            raise ModelLoadError(f"This step needs a {what.upper()}; connect one to the node (got None).")
        return obj
