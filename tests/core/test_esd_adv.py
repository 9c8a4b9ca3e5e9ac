"""Adversarial ESD on tiny random models: the attack, the training loop and the settings (efficacy under
attack is tested on ShapesWorld)."""

import pytest
import torch
from concept_guard.core.backend import PLACEHOLDER
from concept_guard.core.errors import ConceptGuardError
from concept_guard.core.methods.esd import ESDConfig, build_bank, train
from concept_guard.core.methods.esd_adv import attack_prompt, build_adversary, erase_prompts
from concept_guard.core.seeding import make_generator
from concept_guard.presets import ADV_STEPS_ON, adversarial_steps, esd_settings

FAST = dict(iterations=4, sampling_steps=4, bank_trajectories=2, latent_size=8, lr=1e-3)
ADV = dict(adv_steps=3, adv_every=2, adv_vectors=2)


def test_attack_prompts_put_the_vectors_where_the_concept_was():
    assert (
        attack_prompt("a red circle, gray background", "a circle") == f"a red {PLACEHOLDER}, gray background"
    )
    assert attack_prompt("Van Gogh", "van gogh") == PLACEHOLDER
    assert attack_prompt("a starry night", "van gogh") == f"a starry night, {PLACEHOLDER}"
    assert attack_prompt("a circles pattern", "circle") == f"a circles pattern, {PLACEHOLDER}"  # whole words
    jobs = erase_prompts(("a circle", "a star"), ("a red circle",))
    assert jobs == [("a circle", "a red circle"), ("a star", "a red circle")]
    assert erase_prompts(("a circle",), ()) == [("a circle", "a circle")]


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(adv_steps=-1), "`adv_steps` must be in"),
        (dict(adv_vectors=0), "`adv_vectors` must be a positive integer"),
        (dict(adv_every=0), "`adv_every` must be a positive integer"),
        (dict(adv_weight=-1.0), "`adv_weight` and `adv_retain`"),
    ],
)
def test_config_rejects_bad_adversarial_values(bad, match):
    with pytest.raises(ConceptGuardError, match=match):
        ESDConfig(concepts="a", **bad)


def test_the_attack_brings_its_prompts_closer_to_the_concept(sd1_backend):
    cfg = ESDConfig(concepts=("a circle",), preserve=("a square",), **FAST, **ADV, adv_lr=5e-2)
    bank = build_bank(sd1_backend, cfg)
    adversary = build_adversary(sd1_backend, cfg, bank, make_generator(0))
    assert adversary.prompts == [f"a {PLACEHOLDER}"]
    assert adversary.keep is not None and len(adversary.keep.t) == len(adversary.t)  # retain rows: "a square"
    before = adversary.gap()
    adversary.attack(40, make_generator(1))
    assert adversary.gap() < 0.8 * before and len(adversary.pool) == 1


def test_adversarial_training_runs_records_and_leaves_the_model_untouched(sd1_backend):
    probe = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, t = sd1_backend.encode_text(["a circle"]), torch.tensor([500])
    weights = [w.clone() for w in sd1_backend.unet.state_dict().values()]
    with torch.no_grad():
        before = sd1_backend.eps(probe, t, cond)
    cfg = ESDConfig(concepts=("a circle",), preserve=("a square",), seed=2, **FAST, **ADV)
    a, b = train(cfg, sd1_backend), train(cfg, sd1_backend)
    plain = train(ESDConfig(concepts=("a circle",), preserve=("a square",), seed=2, **FAST), sd1_backend)
    assert a.losses == b.losses and a.losses != plain.losses  # seeded, and the attack term counts
    assert all(torch.isfinite(v).all() for v in a.tensors.values())
    assert a.metadata["concept_guard.adv_steps"] == "3"
    assert all(
        torch.equal(x, y) for x, y in zip(weights, sd1_backend.unet.state_dict().values(), strict=True)
    )
    with torch.no_grad():
        assert torch.equal(sd1_backend.eps(probe, t, cond), before)


def test_adversarial_is_a_user_choice_with_a_default_per_model(sd1_backend):
    assert (adversarial_steps("on"), adversarial_steps("off"), adversarial_steps("auto")) == (
        ADV_STEPS_ON,
        0,
        None,
    )
    assert ESDConfig(**esd_settings(sd1_backend, "a dog", {})).adv_steps == 0
    on = esd_settings(sd1_backend, "a dog", {"adv_steps": adversarial_steps("on")})
    assert ESDConfig(**on).adv_steps == ADV_STEPS_ON
