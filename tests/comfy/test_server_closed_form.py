"""A real headless ComfyUI runs the closed-form example (Load ShapesWorld -> Erase Concept (closed form) ->
samplers before/after -> judges) at full sampling settings: no download, and the circles go."""

from __future__ import annotations

from safetensors import safe_open
from test_server_e2e import object_info, tiny_prompt  # noqa: F401
from workflows import node_ids, queue, set_inputs

CLOSED_FORM = "ConceptGuardEraseClosedForm"


def _circle_rate(entry: dict, judge: str) -> float:
    """The judge's last line: ``'circle': 0.94``."""
    return float(entry["outputs"][judge]["text"][0].splitlines()[-1].split(":")[1])


def _model_of(prompt: dict, judge: str) -> str:
    """The node whose MODEL made the images a judge sees (judge <- VAEDecode <- KSampler <- model)."""
    decode = prompt[judge]["inputs"]["images"][0]
    sampler = prompt[decode]["inputs"]["samples"][0]
    return prompt[sampler]["inputs"]["model"][0]


def test_shapesworld_closed_form_workflow_erases_the_circle(comfy_server, object_info):  # noqa: F811
    prompt = tiny_prompt("shapesworld_erase_closed_form.json", object_info)
    set_inputs(prompt, "KSampler", steps=20)  # the workflow's own sampling: the judge must see real images
    set_inputs(prompt, CLOSED_FORM, file_name="sw_no_circle")
    entry = queue(comfy_server, prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (edit,) = node_ids(prompt, CLOSED_FORM)
    rates = {
        _model_of(prompt, j) == edit: _circle_rate(entry, j)
        for j in node_ids(prompt, "ConceptGuardShapesWorldJudge")
    }
    (report,) = node_ids(prompt, "PreviewAny")
    text = entry["outputs"][report]["text"][0]
    assert "ShapesWorld (demo model): method uce" in text and "solved in" in text, text
    assert "no longer steer" in text, text  # the concept score's verdict
    saved = comfy_server.base_dir / "models" / "loras" / "concept_guard" / "sw_no_circle.safetensors"
    with safe_open(str(saved), framework="pt") as f:
        assert f.metadata()["concept_guard.method"] == "uce"
    # 16 samples of "a red circle on a white background", same seed: the base draws circles, the edit does not
    assert rates[False] >= 0.75 and rates[True] <= 0.25, rates
