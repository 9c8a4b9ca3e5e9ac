"""Prompt optimisation (UnlearnDiffAtk-style) on tiny random models: the search's mechanics."""

import pytest
import torch
from concept_guard.core.attacks import PromptAttackConfig, allowed_ids, nearest_tokens, optimise_prompt
from concept_guard.core.backend import PLACEHOLDER
from concept_guard.core.errors import ConceptGuardError


def _latents(backend, n=4):
    side = 8 * backend.vae_scale_factor  # 8x8 latents: seconds per search
    images = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0))
    return backend.vae_encode(images)


def _state(backend):
    return [t.clone() for t in backend.unet.state_dict().values()] + [
        t.clone() for enc in backend.text_encoders for t in enc.state_dict().values()
    ]


def test_nearest_tokens_finds_a_vocabulary_row_and_skips_special_ids(sd1_backend):
    table, special = sd1_backend.token_table()
    allowed = allowed_ids(next(iter(table.values())).shape[0], special)
    start = sd1_backend.tokenizers[0].bos_token_id
    assert start in special and not allowed[start]
    ids = torch.tensor([10, 40, start])  # the start token is never proposed
    found = nearest_tokens({s: t[ids] for s, t in table.items()}, table, allowed)
    assert found[:2].tolist() == [10, 40] and int(found[2]) not in special


@pytest.mark.parametrize("discrete", [True, False])
def test_search_moves_only_its_tokens_and_returns_a_prompt(sd1_backend, discrete):
    before = _state(sd1_backend)
    cfg = PromptAttackConfig(prompt=f"{PLACEHOLDER} a circle", tokens=3, steps=25, lr=5e-2, discrete=discrete)
    result = optimise_prompt(sd1_backend, _latents(sd1_backend), cfg)
    assert len(result.losses) == 25 and all(v.shape[0] == 3 for v in result.vectors.values())
    assert all(torch.equal(a, b) for a, b in zip(before, _state(sd1_backend), strict=True))
    table, special = sd1_backend.token_table()
    if discrete:
        assert PLACEHOLDER not in result.prompt and result.prompt.endswith("a circle")
        assert len(result.token_ids) == 3 and not set(result.token_ids) & set(special)
        assert all(torch.equal(result.vectors[s], table[s][result.token_ids].cpu()) for s in table)
    else:
        assert result.prompt == cfg.prompt and result.token_ids == []
        # the vectors moved off the vocabulary rows they started from (the search's gradient reaches them)
        (slot,) = table
        assert torch.cdist(result.vectors[slot], table[slot].cpu()).min(dim=1).values.min() > 1e-3


def test_discrete_search_runs_on_sdxl(sdxl_backend):
    cfg = PromptAttackConfig(prompt=f"a photo of {PLACEHOLDER}", tokens=2, steps=3)
    result = optimise_prompt(sdxl_backend, _latents(sdxl_backend, 2), cfg)
    assert set(result.vectors) == {"clip_l", "clip_g"} and len(result.token_ids) == 2


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(prompt="a circle"), "must hold"),
        (dict(prompt=f"{PLACEHOLDER} {PLACEHOLDER}"), "must hold"),
        (dict(prompt=PLACEHOLDER, tokens=0), "`tokens` must be"),
        (dict(prompt=PLACEHOLDER, lr=0.0), "`lr` must be"),
    ],
)
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ConceptGuardError, match=match):
        PromptAttackConfig(**bad)


def test_no_images_is_one_clear_error(sd1_backend):
    with pytest.raises(ConceptGuardError, match="needs images of the concept"):
        optimise_prompt(sd1_backend, torch.zeros(0, 4, 8, 8), PromptAttackConfig(prompt=PLACEHOLDER, steps=1))
