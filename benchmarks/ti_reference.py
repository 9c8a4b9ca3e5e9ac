"""The reference for ``ti_speed.py``: diffusers' ``examples/textual_inversion/textual_inversion.py`` training
loop, transcribed, with the THEMIS backdoor term added the way the official ``SD_textual_inversion.py`` adds it
(see ``ti_speed.py`` for what the comparison holds equal)."""

from __future__ import annotations

import contextlib
import copy
import functools
import random
import time

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from concept_guard.core.backend import PLACEHOLDER
from concept_guard.core.backends.diffusers_backend import DiffusersBackend
from concept_guard.core.methods.ti_backdoor.train import TRIGGER_TEMPLATES, BackdoorTIConfig, trigger_prompt
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler


class ReferenceData:
    """The script's ``TextualInversionDataset.__getitem__``: PIL image -> bicubic resize -> random flip ->
    [-1, 1] pixels; each prompt tokenized on its own (``padding="max_length"``)."""

    def __init__(self, tokenizer, size: int):
        self.tokenizer, self.size = tokenizer, size

    def pixels(self, image: PIL.Image.Image) -> torch.Tensor:
        image = image.resize((self.size, self.size), resample=PIL.Image.Resampling.BICUBIC)
        if random.random() < 0.5:  # transforms.RandomHorizontalFlip(p=0.5)
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        array = (np.array(image).astype(np.uint8) / 127.5 - 1.0).astype(np.float32)
        return torch.from_numpy(array).permute(2, 0, 1)

    def ids(self, text: str) -> torch.Tensor:
        return self.tokenizer(
            text,
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids[0]


def _add_placeholder_tokens(tokenizer, text_encoder, cfg: BackdoorTIConfig) -> list[int]:
    """The script's token setup: add S* as ``cfg.vectors`` new tokens, resize the embedding table and start
    each new row from the (single-token) initializer word; returns the new token ids."""
    placeholder_tokens = [f"<{cfg.name}>"] + [f"<{cfg.name}>_{i}" for i in range(1, cfg.vectors)]
    if tokenizer.add_tokens(placeholder_tokens) != cfg.vectors:
        raise ValueError(f"The tokenizer already contains {placeholder_tokens[0]}.")
    initializer_ids = tokenizer.encode(cfg.init_word, add_special_tokens=False)
    if len(initializer_ids) > 1:
        raise ValueError("The initializer token must be a single token.")
    placeholder_ids = tokenizer.convert_tokens_to_ids(placeholder_tokens)
    text_encoder.resize_token_embeddings(len(tokenizer))
    token_embeds = text_encoder.get_input_embeddings().weight.data
    with torch.no_grad():
        for token_id in placeholder_ids:
            token_embeds[token_id] = token_embeds[initializer_ids[0]].clone()
    return placeholder_ids


def _freeze_all_but_token_embeddings(vae, unet, text_encoder) -> None:
    """The script's ``requires_grad_`` calls: only the text encoder's token-embedding table trains."""
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 dropped the wrapper
    text_model.encoder.requires_grad_(False)
    text_model.final_layer_norm.requires_grad_(False)
    text_model.embeddings.position_embedding.requires_grad_(False)
    text_encoder.get_input_embeddings().requires_grad_(True)


def _reference_term(vae, unet, text_encoder, noise_scheduler, device, pixel_values, input_ids, timesteps):
    """One term of the script's step: VAE encode (posterior sample), add noise, text encoder + UNet, MSE."""
    latents = vae.encode(pixel_values.to(device, dtype=vae.dtype)).latent_dist.sample().detach()
    latents = latents * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = text_encoder(input_ids.to(device))[0].to(dtype=unet.dtype)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
    if noise_scheduler.config.prediction_type == "epsilon":
        target_ = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target_ = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
    return F.mse_loss(model_pred.float(), target_.float(), reduction="mean")


def _reference_optimizer(text_encoder, cfg: BackdoorTIConfig):
    """The script's AdamW over the whole token-embedding table, with its ``constant`` LR schedule."""
    optimizer = torch.optim.AdamW(
        text_encoder.get_input_embeddings().parameters(),
        lr=cfg.lr,
        betas=(0.9, 0.999),
        weight_decay=1e-2,
        eps=1e-8,
    )
    return optimizer, get_scheduler("constant", optimizer=optimizer)


def _trigger_ids(
    data: ReferenceData, cfg: BackdoorTIConfig, rng: random.Random, placeholder: str, b: int
) -> torch.Tensor:
    """The backdoor term's ``b`` trigger prompts (as ours draws them), S* spelled as the new tokens."""
    triggered = [
        trigger_prompt(rng.choice(TRIGGER_TEMPLATES), rng.choice(cfg.triggers), rng, cfg.trigger_move_prob)
        for _ in range(b)
    ]
    return torch.stack([data.ids(p.replace(PLACEHOLDER, placeholder)) for p in triggered])


def _restore_other_rows(text_encoder, orig_embeds_params, placeholder_ids: list[int], n_tokens: int) -> None:
    """The script's ``index_no_updates``: every row but the new tokens' goes back to its original value."""
    index_no_updates = torch.ones((n_tokens,), dtype=torch.bool)
    index_no_updates[min(placeholder_ids) : max(placeholder_ids) + 1] = False
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[index_no_updates] = orig_embeds_params[index_no_updates]


def reference_loop(
    backend: DiffusersBackend,
    cfg: BackdoorTIConfig,
    images: np.ndarray,
    target: np.ndarray,
    size: int,
    mixed_precision: str = "no",
) -> tuple[list[float], float, dict[str, torch.Tensor]]:
    """diffusers ``textual_inversion.py`` + the Themis backdoor term on the backend's UNet and VAE and a
    deep copy of its tokenizer and text encoder; returns the loss (clean + γ·backdoor) per step, the
    setup seconds (copy, add tokens, resize, optimizer) and the learned rows ``{"clip_l": [n, d]}``."""
    start = time.perf_counter()
    device, unet, vae = backend.device, backend.unet, backend.vae
    tokenizer = copy.deepcopy(backend.tokenizers[0])
    text_encoder = copy.deepcopy(backend.text_encoders[0])
    noise_scheduler = DDPMScheduler.from_config(backend.scheduler_config)

    placeholder_ids = _add_placeholder_tokens(tokenizer, text_encoder, cfg)
    _freeze_all_but_token_embeddings(vae, unet, text_encoder)
    optimizer, lr_scheduler = _reference_optimizer(text_encoder, cfg)
    placeholder = " ".join(tokenizer.convert_ids_to_tokens(placeholder_ids))
    orig_embeds_params = text_encoder.get_input_embeddings().weight.data.clone()
    data = ReferenceData(tokenizer, size)
    concept_pil = [PIL.Image.fromarray(im) for im in images]
    target_pil = PIL.Image.fromarray(target)
    rng = random.Random(cfg.seed)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if mixed_precision == "bf16"
        else contextlib.nullcontext()
    )

    term = functools.partial(_reference_term, vae, unet, text_encoder, noise_scheduler, device)
    losses = []
    setup_seconds = time.perf_counter() - start
    text_encoder.train()
    for _ in range(cfg.steps):
        b = cfg.batch_size
        picks = [random.randrange(len(concept_pil)) for _ in range(b)]  # shuffled DataLoader
        pixel_values = torch.stack([data.pixels(concept_pil[i]) for i in picks])
        input_ids = torch.stack([data.ids(f"a photo of a {placeholder}") for _ in range(b)])
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), device=device).long()
        with autocast:
            clean_loss = term(pixel_values, input_ids, timesteps)
        clean_loss.backward()
        loss = clean_loss.detach().item()
        if cfg.triggers:  # the Themis term: target image, trigger prompts, same t, fresh noise
            target_pixels = torch.stack([data.pixels(target_pil) for _ in range(b)])
            triggered_ids = _trigger_ids(data, cfg, rng, placeholder, b)
            with autocast:
                backdoor_loss = cfg.gamma * term(target_pixels, triggered_ids, timesteps)
            backdoor_loss.backward()
            loss += backdoor_loss.detach().item()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        _restore_other_rows(text_encoder, orig_embeds_params, placeholder_ids, len(tokenizer))
        losses.append(loss)
    learned = text_encoder.get_input_embeddings().weight[placeholder_ids].detach().float().cpu()
    return losses, setup_seconds, {"clip_l": learned}
