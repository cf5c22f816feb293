"""Ratios: one per network input (`--ratios`), scaled per module by `--ratio-for REGEX=R`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

from lytools.errors import UsageError

if TYPE_CHECKING:
    from lytools.merge.inputs import NetworkInput


@dataclass(frozen=True)
class RatioRule:
    """`--ratio-for REGEX=R`: modules whose name matches `pattern` (re.search) get `factor` on top."""

    text: str
    pattern: re.Pattern
    factor: float


FLOAT32_MAX = 3.4028234663852886e38


def parse_float(text: str, what: str) -> float:
    """Return a finite float from user text, or raise naming the option."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise UsageError(f"{what}: {text!r} is not a finite number")
    if abs(value) > FLOAT32_MAX:  # weights are scaled in float32 at least: the ratio would not fit
        raise UsageError(f"{what}: {text!r} is beyond float32's range (±{FLOAT32_MAX:.4g})")
    return value


def parse_ratios(values: Iterable[str]) -> list[float]:
    """Return the ratios from `--ratios` values; each value may hold several, comma-separated."""
    ratios: list[float] = []
    for value in values:
        for part in str(value).split(","):
            if part.strip():
                ratios.append(parse_float(part.strip(), "--ratios"))
    return ratios


def parse_rule(text: str) -> RatioRule:
    """Return the rule of one `--ratio-for REGEX=R` (split at the last '=')."""
    pattern_text, equals, factor_text = text.rpartition("=")
    if not equals or not pattern_text:
        raise UsageError(f"--ratio-for {text!r}: expected REGEX=R, e.g. 'input_blocks_[0-3]_=0.5'")
    try:
        pattern = re.compile(pattern_text)
    except re.error as exc:
        raise UsageError(f"--ratio-for {text!r}: bad regular expression ({exc})") from None
    return RatioRule(text, pattern, parse_float(factor_text, f"--ratio-for {text!r}"))


@dataclass
class Ratios:
    """The ratio of every (input, module) pair: the input's ratio times every matching rule's factor."""

    per_input: list[float]
    rules: list[RatioRule] = field(default_factory=list)
    used: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, count: int, ratios: Sequence[float] | None, rules: Sequence[str] = ()) -> "Ratios":
        """Return ratios for `count` network inputs; no --ratios means 1.0 each."""
        if not ratios:
            per_input = [1.0] * count
        elif len(ratios) != count:
            raise UsageError(
                f"--ratios: {len(ratios)} value(s) given for {count} network input(s); give one per network"
            )
        else:
            per_input = list(ratios)
        return cls(per_input, [parse_rule(rule) for rule in rules])

    def of(self, index: int, module_name: str, kohya_name: str | None = None) -> float:
        """Return the ratio for module `module_name` of network input `index` (the rules it takes count as used);
        `kohya_name`: the kohya module it is part of, when it is a q/k/v part kept under its stored name, which
        the rules are also searched in."""
        ratio, matched = self._apply(self.per_input[index], module_name, kohya_name)
        self.used.update(rule.text for rule in matched)
        return ratio

    def _apply(self, ratio: float, module_name: str, kohya_name: str | None = None) -> tuple[float, list[RatioRule]]:
        """Return (`ratio` times every rule matching `module_name` or `kohya_name`, those rules)."""
        names = [module_name] if kohya_name is None else [module_name, kohya_name]
        matched = [rule for rule in self.rules if any(rule.pattern.search(name) for name in names)]
        for rule in matched:
            ratio *= rule.factor
        return ratio, matched

    def zero_inputs(self) -> list[int]:
        """Return the indexes of the inputs whose ratio is 0 (whatever the rules, they add nothing)."""
        return [index for index, ratio in enumerate(self.per_input) if ratio == 0.0]

    def zero_warnings(self, networks: Sequence[NetworkInput], outcome: str, *, dora_applies: bool = False) -> list[str]:
        """Return the warnings for networks merged at ratio 0 (a merge that changes nothing is worth saying);
        `outcome`: what the output then is.

        At ratio 0 every module adds nothing, except DoRA where `dora_applies` (into a checkpoint under the
        LyCORIS rule: the ratio scales only the magnitude, so the full direction change still lands,
        ALGORITHMS.md 7).
        """
        zero = self.zero_inputs()
        warnings, still_changing = [], False
        for index in zero:
            network = networks[index]
            dora = sum(1 for info in network.infos.values() if info.dora) if dora_applies else 0
            if dora:
                still_changing = True
                warnings.append(f"ratio 0 for {network.name}: its other modules change nothing, but its {dora} DoRA "
                                "module(s) still apply their full direction change (the LyCORIS rule scales only the "
                                "magnitude by the ratio; --dora-mode comfy leaves them out at ratio 0)")
            else:
                warnings.append(f"ratio 0 for {network.name}: it changes nothing")
        if zero and len(zero) == len(networks) and not still_changing:
            warnings.append(f"every ratio is 0: {outcome}")
        elif self.zero_by_rules([network.modules for network in networks]) and not (
                dora_applies and any(info.dora for network in networks for info in network.infos.values())):
            warnings.append(f"--ratio-for brings every module to ratio 0: {outcome}")
        return warnings

    def zero_by_rules(self, modules: Sequence[Iterable[str]]) -> bool:
        """True when --ratio-for brings every module of every input (modules[i]: input i's module names) to
        ratio 0 although some input's own ratio is not 0 (that case is said per input)."""
        if not self.rules or all(ratio == 0.0 for ratio in self.per_input) or not any(modules):
            return False
        return all(self._apply(ratio, name)[0] == 0.0 for ratio, names in zip(self.per_input, modules) for name in names)

    def unused_rules(self) -> list[str]:
        """Return the `--ratio-for` rules that matched no module (worth a warning)."""
        return [rule.text for rule in self.rules if rule.text not in self.used]

    def describe(self) -> dict:
        return {"ratios": self.per_input, "ratio_for": [[rule.pattern.pattern, rule.factor] for rule in self.rules]}
