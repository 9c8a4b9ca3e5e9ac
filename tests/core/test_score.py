"""The concept score: 1 for an untouched prompt, lower when an edit removes the prompt's guidance."""

from __future__ import annotations

import torch
from concept_guard.core.score import NOT_ERASED, PromptScore, concept_scores, score_edit, score_report


def _attn2_keys(backend) -> list[str]:
    return [n for n in backend.unet_module_names() if n.endswith("attn2.to_v")]


def test_a_zero_edit_scores_one_and_leaves_the_backend_as_it_was(sd1_backend):
    names = _attn2_keys(sd1_backend)
    with torch.no_grad():
        deltas = sd1_backend.attach_deltas(names)
        try:
            (same,) = concept_scores(
                sd1_backend, deltas, ["a red circle"], trajectories=2, steps=3, latent_size=8
            )
        finally:
            deltas.detach()
    assert same.score == 1.0 and same.direction == 1.0 and same.norm_ratio == 1.0


def test_removing_the_text_path_removes_the_guidance(sd1_backend):
    # to_v of every cross-attention set to -W: the text's values cancel, so prompts steer (almost) nothing
    modules = _attn2_keys(sd1_backend)
    weights = dict(sd1_backend.unet.named_parameters())
    tensors = {
        f"{m}.weight": -weights[f"{sd1_backend.keymap.to_diffusers(m)}.weight"].detach().float()
        for m in modules
    }
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    cond = sd1_backend.encode_text(["a red circle"])
    before = sd1_backend.eps(x, t, cond)
    erased, kept = score_edit(sd1_backend, tensors, ["a red circle"], [], latent_size=8)
    assert abs(erased[0].score) < 0.2 and kept == []
    assert torch.equal(sd1_backend.eps(x, t, cond), before)  # the edit was attached only while scoring


def test_report_says_plainly_when_a_concept_was_not_erased():
    still = PromptScore(prompt="a circle", score=0.95, norm_ratio=0.95, direction=1.0)
    gone = PromptScore(prompt="a circle", score=0.05, norm_ratio=0.3, direction=0.17)
    kept = PromptScore(prompt="a square", score=0.97, norm_ratio=1.0, direction=0.97)
    assert "NOT ERASED: a circle" in score_report([still], [kept]) and NOT_ERASED < 0.95
    assert "NOT ERASED" not in score_report([gone], [kept])
