"""Memory policy of ComfyBackend (``nodes/comfy_memory.py``): teacher calls in row chunks, gradient checkpointing."""

from __future__ import annotations

import torch
from concept_guard.comfy_backend import memory as comfy_memory
from concept_guard.comfy_backend.backend import ComfyBackend
from concept_guard.nodes.esd import EraseConceptESD

ATTN2 = ".attn2."


def _x_t(batch: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _counting(backend: ComfyBackend) -> list[int]:
    """Record the batch of every UNet call the backend makes."""
    calls: list[int] = []
    inner = backend._eps

    def counted(x, t, cond):
        calls.append(int(x.shape[0]))
        return inner(x, t, cond)

    backend._eps = counted
    return calls


def test_rows_per_call_follows_comfyuis_activation_estimate(tiny_model):
    base = tiny_model.model
    per_row = base.memory_required([1, 4, 8, 8])
    assert per_row > 0
    assert comfy_memory.rows_per_call(base, (16, 4, 8, 8), 3.5 * per_row) == 3
    assert comfy_memory.rows_per_call(base, (16, 4, 8, 8), 0) == 1  # never below one row
    assert comfy_memory.rows_per_call(base, (16, 4, 8, 8), 1e30) == 16  # never above the batch


def test_default_budget_is_a_share_of_the_weights_with_a_floor(tiny_model, tiny_clip):
    unet = tiny_model.model.diffusion_model
    expected = sum(t.numel() * t.element_size() for t in [*unet.parameters(), *unet.buffers()])
    assert comfy_memory.weight_bytes(unet) == expected > 0
    share = comfy_memory.TEACHER_ACTIVATION_SHARE * expected
    assert comfy_memory.teacher_budget(unet) == max(share, comfy_memory.MIN_TEACHER_BUDGET)
    assert ComfyBackend(tiny_model, tiny_clip).teacher_budget == comfy_memory.teacher_budget(unet)


def test_teacher_calls_run_in_row_chunks_with_the_same_result(tiny_model, tiny_clip):
    whole = ComfyBackend(tiny_model, tiny_clip, teacher_budget=1e30)
    split = ComfyBackend(tiny_model, tiny_clip, teacher_budget=0.0)
    assert split.teacher_budget == 0 < whole.teacher_budget
    cond = whole.encode_text(["a red circle"])  # one row, broadcast to the batch
    x, t = _x_t(3), torch.tensor([50, 400, 900])
    whole_calls, split_calls = _counting(whole), _counting(split)
    expected = whole.eps(x, t, cond)
    got = split.eps(x, t, cond)
    assert whole_calls == [3] and split_calls == [1, 1, 1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    one_t = split.eps(x, torch.tensor([400]), cond)  # a single timestep for the whole batch
    torch.testing.assert_close(one_t[1], got[1], rtol=1e-5, atol=1e-6)


def test_student_calls_are_not_split(tiny_model, tiny_clip):
    backend = ComfyBackend(tiny_model, tiny_clip, teacher_budget=0.0)
    cond = backend.encode_text(["a circle"])
    calls = _counting(backend)
    with torch.inference_mode(), backend.training():
        with backend.attach_deltas([n for n in backend.unet_module_names() if ATTN2 in n]):
            eps = backend.eps(_x_t(2), torch.tensor([10, 900]), cond.expand_to(2))
    assert calls == [2] and eps.requires_grad


def _delta_grads(model, clip, checkpointing: bool) -> tuple[list[torch.Tensor], int]:
    backend = ComfyBackend(model, clip)
    cond = backend.encode_text(["a red circle"]).expand_to(2)
    unet = backend.patcher.model.diffusion_model
    with torch.inference_mode(), backend.training(checkpointing=checkpointing):
        wrapped = sum("forward" in m.__dict__ for m in unet.modules())
        with backend.attach_deltas([n for n in backend.unet_module_names() if ATTN2 in n]) as deltas:
            gen = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for p in deltas.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            backend.eps(_x_t(2), torch.tensor([30, 700]), cond).pow(2).mean().backward()
            grads = [p.grad.detach().clone() for p in deltas.parameters()]
    return grads, wrapped


def test_gradient_checkpointing_gives_the_same_gradients_and_is_undone(tiny_model, tiny_clip):
    plain, none_wrapped = _delta_grads(tiny_model, tiny_clip, checkpointing=False)
    checkpointed, wrapped = _delta_grads(tiny_model, tiny_clip, checkpointing=True)
    assert none_wrapped == 0 and wrapped >= 5  # ResBlocks, SpatialTransformers, convs of the tiny UNet
    assert len(plain) == len(checkpointed) and all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    assert not any("forward" in m.__dict__ for m in tiny_model.model.diffusion_model.modules())


def test_esd_node_has_an_optional_low_memory_switch():
    info = EraseConceptESD.INPUT_TYPES()
    assert (
        info["optional"]["low_memory"][0] == "BOOLEAN"
        and info["optional"]["low_memory"][1]["default"] is True
    )


def test_small_unets_are_not_worth_checkpointing(tiny_model, monkeypatch):
    from concept_guard.comfy_backend import memory

    unet = tiny_model.model.diffusion_model
    assert not memory.worth_checkpointing(unet)  # a few MiB: the node trains it without checkpointing
    monkeypatch.setattr(memory, "MIN_CHECKPOINT_BYTES", memory.weight_bytes(unet))
    assert memory.worth_checkpointing(unet)
