import torch
from concept_guard.core.delta import DeltaSet, WeightDelta


def make_set():
    deltas = {
        "a.to_k": WeightDelta(torch.Size([3, 4]), torch.Size([3]), "cpu"),
        "b.conv": WeightDelta(torch.Size([2, 2, 1, 1]), None, "cpu"),
    }
    return DeltaSet(deltas), deltas


def test_zero_delta_is_identity_and_teacher_switch_restores():
    ds, d = make_set()
    w = torch.randn(3, 4, dtype=torch.float16)
    assert torch.equal(d["a.to_k"].apply_to_weight(w), w)
    with torch.no_grad():
        d["a.to_k"].weight.fill_(0.5)
    assert torch.allclose(d["a.to_k"].apply_to_weight(w).float(), (w.float() + 0.5).half().float())
    with ds.teacher():
        assert not ds.enabled and not d["a.to_k"].enabled
        assert d["a.to_k"].apply_to_weight(w) is w
        assert not torch.is_grad_enabled()
    assert ds.enabled


def test_teacher_restores_on_exception_and_keeps_requires_grad():
    ds, _ = make_set()
    try:
        with ds.teacher():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert ds.enabled
    assert all(p.requires_grad for p in ds.parameters())


def test_state_dict_ldm_and_detach_callback():
    calls = []
    deltas = {"a.to_k": WeightDelta(torch.Size([3, 4]), torch.Size([3]), "cpu")}
    ds = DeltaSet(deltas, on_detach=lambda: calls.append(1))
    sd = ds.state_dict_ldm()
    assert set(sd) == {"a.to_k.weight", "a.to_k.bias"} and sd["a.to_k.weight"].dtype == torch.float32
    assert ds.names() == ["a.to_k"] and ds.num_parameters() == 15
    with ds:
        pass
    ds.detach()
    assert calls == [1]
