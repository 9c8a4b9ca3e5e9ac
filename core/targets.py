"""Which UNet weights a method trains, selected by LDM module names (peft-style matching).

A pattern is either a regular expression matched with ``fullmatch`` against the whole module
name, or a dotted suffix/infix such as ``attn2`` or ``attn2.to_k`` that must line up with whole
name components. Nothing matching is an error that lists the patterns and some real names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import NoMatchingModulesError


def _component_match(name: str, pattern: str) -> bool:
    parts, pat = name.split("."), pattern.split(".")
    return any(parts[i : i + len(pat)] == pat for i in range(len(parts) - len(pat) + 1))


def matches(name: str, pattern: str) -> bool:
    """True if ``pattern`` (regex if it contains regex metacharacters, else dotted components) selects ``name``."""
    if any(ch in pattern for ch in "^$*+?[](){}|\\"):
        return re.fullmatch(pattern, name) is not None
    return _component_match(name, pattern)


@dataclass(frozen=True, kw_only=True)
class TargetSpec:
    """A selection of UNet modules.

    Args:
        include (`tuple[str, ...]`): patterns; a module is selected if any matches (empty = all).
        exclude (`tuple[str, ...]`): patterns that remove modules again.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def select(self, names: Iterable[str]) -> list[str]:
        """Return the selected names in their original order.

        Raises:
            NoMatchingModulesError: nothing was selected.
        """
        names = list(names)
        chosen = [
            n
            for n in names
            if (not self.include or any(matches(n, p) for p in self.include))
            and not any(matches(n, p) for p in self.exclude)
        ]
        if not chosen:
            sample = ", ".join(names[:6]) + (" …" if len(names) > 6 else "")
            raise NoMatchingModulesError(
                f"No UNet module matched include={list(self.include)} exclude={list(self.exclude)} "
                f"among {len(names)} modules (e.g. {sample}). Use LDM names such as 'attn2' or 'attn2.to_k'."
            )
        return chosen


# ESD's methods (Gandikota et al. 2023; names as in the official 2025 scripts), by LDM names.
ESD_METHODS: dict[str, TargetSpec] = {
    # every cross-attention projection: erases what a word means, keeps the rest
    "esd-x": TargetSpec(include=("attn2",)),
    # only the key/value projections of the text: the most specific variant
    "esd-x-strict": TargetSpec(include=("attn2.to_k", "attn2.to_v")),
    # everything but cross-attention, time embedding and output layers ("noxattn"): global concepts
    "esd-u": TargetSpec(exclude=("attn2", "time_embed", "label_emb", "out")),
    # self-attention only
    "esd-selfattn": TargetSpec(include=("attn1",)),
    "esd-all": TargetSpec(),
}


def select_for_method(method: str, names: Sequence[str]) -> list[str]:
    """Module names trained by ESD ``method``.

    Raises:
        NoMatchingModulesError: unknown method, or nothing matched.
    """
    try:
        spec = ESD_METHODS[method]
    except KeyError:
        raise NoMatchingModulesError(
            f"`method` must be one of {sorted(ESD_METHODS)}, got {method!r}."
        ) from None
    return spec.select(names)
