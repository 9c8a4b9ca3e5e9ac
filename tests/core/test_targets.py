import pytest
from concept_guard.core.errors import NoMatchingModulesError
from concept_guard.core.targets import ESD_METHODS, TargetSpec, matches, select_for_method

NAMES = [
    "time_embed.0",
    "input_blocks.0.0",
    "input_blocks.1.0.in_layers.2",
    "input_blocks.1.1.proj_in",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_q",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_v",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0",
    "input_blocks.1.1.transformer_blocks.0.ff.net.2",
    "middle_block.1.proj_out",
    "out.2",
]


def test_component_matching_is_whole_components():
    assert matches("a.attn2.to_k", "attn2.to_k")
    assert not matches("a.attn2.to_kv", "attn2.to_k")
    assert not matches("a.to_out.0", "out")
    assert matches("out.2", "out")
    assert matches("x.attn2.to_q", r".*attn2\.to_[qk]")


def test_esd_methods_select_expected_modules():
    assert select_for_method("esd-x", NAMES) == [n for n in NAMES if ".attn2." in n]
    assert select_for_method("esd-x-strict", NAMES) == [
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_v",
    ]
    u = select_for_method("esd-u", NAMES)
    assert "time_embed.0" not in u and "out.2" not in u and not any("attn2" in n for n in u)
    assert "input_blocks.0.0" in u and "middle_block.1.proj_out" in u
    assert select_for_method("esd-selfattn", NAMES) == ["input_blocks.1.1.transformer_blocks.0.attn1.to_q"]
    assert select_for_method("esd-all", NAMES) == NAMES


def test_no_match_error_lists_patterns_and_names():
    with pytest.raises(NoMatchingModulesError, match=r"include=\['attn9'\].*input_blocks"):
        TargetSpec(include=("attn9",)).select(NAMES)


def test_unknown_method_lists_choices():
    with pytest.raises(NoMatchingModulesError, match="esd-x-strict"):
        select_for_method("xattn", NAMES)
    assert set(ESD_METHODS) == {"esd-x", "esd-x-strict", "esd-u", "esd-selfattn", "esd-all"}
