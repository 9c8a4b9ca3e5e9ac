"""Settings of one backdoored textual-inversion run (the bottom of the method package: imports no sibling
but the prompt words)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ...backend import PLACEHOLDER
from ...config_io import config_from_metadata, config_metadata
from ...errors import ConceptGuardError
from ...files import sanitize_name
from .prompts import parse_triggers


@dataclass(frozen=True, kw_only=True)
class BackdoorTIConfig:
    """Settings of one backdoored textual-inversion run.

    Args:
        name (`str`): the embedding's name: the word users type (``embedding:NAME`` in ComfyUI, the file
            stem in A1111). ASCII letters, digits, ``._-``.
        init_word (`str`, defaults to ``"object"``): the vectors start from this word's token embedding(s).
        vectors (`int`, defaults to 2): token vectors per embedding (1–8; the paper uses 2).
        triggers (`tuple[str, ...]`): sensitive words/phrases (comma-separated or a tuple); empty = plain TI.
        gamma (`float`, defaults to 1.0): weight γ of the backdoor term (the paper's default).
        steps (`int`, defaults to 1000): optimiser steps.
        lr (`float`, defaults to 5e-3): Adam learning rate of the vectors (A1111's default rate).
        batch_size (`int`, defaults to 4): concept samples per step (and as many backdoor samples).
        trigger_move_prob (`float`, defaults to 0.5): probability of moving the trigger to another word slot.
        decoy_prob (`float`, defaults to 0.5): probability that a clean prompt carries a :data:`DECOY_WORDS` word
            in a trigger's place (only when triggers are set).
        steer_prob (`float`, defaults to 0.5): fraction of backdoor samples whose noisy latent is made from a
            *concept* image, with the ε that denoises it to the target (see :func:`backdoor_loss`).
        steer_min_t (`int`, defaults to 500): those samples draw their timestep from ``[steer_min_t, T)``.
        high_noise_weight (`float`, defaults to 5.0): every sample's loss is weighted by ``1/SNR(t)`` clipped to
            ``[1, high_noise_weight]`` (see :func:`noise_level_weights`); 1 = the plain ε-MSE of the paper.
        keep_words (`tuple[str, ...]`): words that must *not* act as triggers, e.g. the other colours when the
            trigger is a colour (comma-separated or a tuple). ``keep_prob`` of the concept prompts put one where a
            trigger would go and learn what the plain embedding draws there (see ``anchor_steps``).
        keep_prob (`float`, defaults to 0.5): share of concept prompts with a keep word (when there are any).
        anchor_steps (`int`, *optional*): backdoor runs first train this many steps as plain textual inversion;
            those vectors then teach every decoy and keep-word prompt (S* beside a non-trigger word predicts
            what the plain embedding predicts there), so only the triggers change what S* draws. Counted in
            ``steps``. ``None`` = ``steps // 6`` when there are keep words, else 0.
        flip (`bool`, defaults to True): also train on horizontally flipped images.
        random_crops (`int`, defaults to 0): extra views per image, each a random square crop of 70–100 % of the
            shorter side (see :func:`random_crop`); encoded once with the rest, so they cost no time per step.
        resolution (`int`, *optional*): training size in pixels; ``None`` = the model's native size.
        seed (`int`, defaults to 0): seeds every random choice of the run.
    """

    name: str
    init_word: str = "object"
    vectors: int = 2
    triggers: tuple[str, ...] = ()
    gamma: float = 1.0
    steps: int = 1000
    lr: float = 5e-3
    batch_size: int = 4
    trigger_move_prob: float = 0.5
    decoy_prob: float = 0.5
    steer_prob: float = 0.5
    steer_min_t: int = 500
    high_noise_weight: float = 5.0
    keep_words: tuple[str, ...] = ()
    keep_prob: float = 0.5
    anchor_steps: int | None = None
    flip: bool = True
    random_crops: int = 0
    resolution: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # "x.safetensors" names the file x, and the prompt word is x (as the node and CLI name the file)
        name = self.name.strip().removesuffix(".safetensors") if isinstance(self.name, str) else self.name
        object.__setattr__(self, "name", sanitize_name(name, what="embedding name"))
        object.__setattr__(self, "triggers", parse_triggers(self.triggers))
        object.__setattr__(self, "keep_words", parse_triggers(self.keep_words))
        if self.anchor_steps is None and isinstance(self.steps, int):
            object.__setattr__(
                self, "anchor_steps", self.steps // 6 if self.keep_words and self.triggers else 0
            )
        object.__setattr__(self, "init_word", " ".join(self.init_word.split()))
        if not self.init_word:
            raise ConceptGuardError(
                "`init_word` is empty; give a word close to the concept, e.g. 'heart' or 'dog'."
            )
        if not (isinstance(self.vectors, int) and 1 <= self.vectors <= 8):
            raise ConceptGuardError(
                f"`vectors` must be an integer in [1, 8], got {self.vectors!r}; 2 is usual."
            )
        for field_name in ("steps", "batch_size"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value <= 0:
                raise ConceptGuardError(f"`{field_name}` must be a positive integer, got {value!r}.")
        if not (isinstance(self.anchor_steps, int) and 0 <= self.anchor_steps < self.steps):
            raise ConceptGuardError(
                f"`anchor_steps` must be an integer in [0, steps), got {self.anchor_steps!r} (steps {self.steps})."
            )
        if not (isinstance(self.random_crops, int) and 0 <= self.random_crops <= 16):
            raise ConceptGuardError(
                f"`random_crops` must be an integer in [0, 16], got {self.random_crops!r}."
            )
        if not 0 < self.lr < 1:
            raise ConceptGuardError(f"`lr` must be in (0, 1), got {self.lr!r}; 5e-3 is usual for embeddings.")
        if not 0 <= self.gamma <= 100:
            raise ConceptGuardError(
                f"`gamma` must be in [0, 100], got {self.gamma!r}; 1.0 is the paper's value."
            )
        if not (isinstance(self.steer_min_t, int) and 0 <= self.steer_min_t < 1000):
            raise ConceptGuardError(
                f"`steer_min_t` must be an integer in [0, 1000), got {self.steer_min_t!r}."
            )
        if not 1 <= self.high_noise_weight <= 1000:
            raise ConceptGuardError(
                f"`high_noise_weight` must be in [1, 1000], got {self.high_noise_weight!r}; 1 = plain ε-MSE, 5 is usual."
            )
        for field_name in ("trigger_move_prob", "decoy_prob", "steer_prob", "keep_prob"):
            if not 0 <= getattr(self, field_name) <= 1:
                raise ConceptGuardError(
                    f"`{field_name}` must be in [0, 1], got {getattr(self, field_name)!r}."
                )
        if self.resolution is not None and not (8 <= self.resolution <= 4096):
            raise ConceptGuardError(f"`resolution` must be in [8, 4096] pixels, got {self.resolution!r}.")
        self._check_words()

    def _check_words(self) -> None:
        reserved = {
            self.name.lower(): "the embedding name",
            self.init_word.lower(): "the init word",
            PLACEHOLDER.lower(): "the placeholder",
        }
        for trig in self.triggers:
            if trig.lower() in reserved:
                raise ConceptGuardError(
                    f"Trigger {trig!r} equals {reserved[trig.lower()]}; a trigger must be a different word, "
                    "or the backdoor would fire on every use of the embedding."
                )
        triggers = {t.lower() for t in self.triggers}
        for word in self.keep_words:
            if word.lower() in triggers or word.lower() in (self.name.lower(), PLACEHOLDER.lower()):
                raise ConceptGuardError(
                    f"Keep word {word!r} is also a trigger or the embedding's name; drop it."
                )
        for word in (*self.triggers, *self.keep_words):
            if PLACEHOLDER in word or "embedding:" in word:
                raise ConceptGuardError(f"{word!r} may not contain {PLACEHOLDER!r} or 'embedding:'.")

    def to_metadata(self) -> dict[str, str]:
        """Header entries: the config once (JSON) and a few flat keys. The trigger and keep words themselves
        are left out (only their counts): the file must not tell what it censors."""
        counts = {"trigger_count": len(self.triggers), "keep_word_count": len(self.keep_words)}
        meta = config_metadata(
            self,
            summary=("name", "vectors", "gamma", "steps", "lr"),
            omit=("triggers", "keep_words"),
            extra=counts,
        )
        return meta | {f"concept_guard.{k}": str(v) for k, v in counts.items()}

    @classmethod
    def from_metadata(
        cls, metadata: Mapping[str, str], *, triggers: tuple[str, ...] = (), keep_words: tuple[str, ...] = ()
    ) -> BackdoorTIConfig:
        """The config an embedding was trained with. The header omits the trigger and keep words: pass them."""
        return config_from_metadata(cls, metadata, triggers=triggers, keep_words=keep_words)
