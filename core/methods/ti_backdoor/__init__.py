"""Backdoored textual inversion (Wu et al. 2023; THEMIS, NDSS 2025): ``config`` (settings), ``prompts``
(templates and trigger placement), ``images`` (resize/crop policy, censor card, latent cache, preview) and
``train`` (the loss and the training run)."""

from .config import BackdoorTIConfig
from .prompts import parse_triggers
from .train import backdoor_loss, train

__all__ = ["BackdoorTIConfig", "backdoor_loss", "parse_triggers", "train"]
