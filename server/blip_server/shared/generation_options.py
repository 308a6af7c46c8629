"""Generation options of one caption request, their defaults and the limits a deployment enforces.

Semantics are those of `transformers` `generate()`: the same names, the same meaning. A value outside its
allowed range is refused with a message that names the option and the range, never silently clamped.

`preprocess` resolves a request's options (defaults for what is unset, then validation) and hands them to
`text_decoder` as one JSON tensor, so that the decoder's dynamic batcher sees the same inputs for every
request whichever options they set. This file is the single source; `blip-export` copies it into both models.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Dataclass = TypeVar("_Dataclass", bound="DataclassInstance")

# Triton input of the `blip_caption` ensemble -> (GenerationOptions field, Python type).
TRITON_INPUTS = {
    "NUM_BEAMS": ("num_beams", int),
    "MAX_NEW_TOKENS": ("max_new_tokens", int),
    "MIN_NEW_TOKENS": ("min_new_tokens", int),
    "LENGTH_PENALTY": ("length_penalty", float),
    "REPETITION_PENALTY": ("repetition_penalty", float),
    "NUM_RETURN_SEQUENCES": ("num_return_sequences", int),
    "NO_REPEAT_NGRAM_SIZE": ("no_repeat_ngram_size", int),
    "DO_SAMPLE": ("do_sample", bool),
    "TEMPERATURE": ("temperature", float),
    "TOP_K": ("top_k", int),
    "TOP_P": ("top_p", float),
    "SEED": ("seed", int),
}


def from_parameters(cls: type[_Dataclass], parameters: Mapping[str, str], prefix: str) -> _Dataclass:
    """An instance of dataclass `cls` whose fields are overridden by `<prefix><field>` config parameters."""
    base = cls()
    values: dict[str, object] = {}
    for f in fields(cls):
        raw = parameters.get(prefix + f.name)
        if raw:
            kind = type(getattr(base, f.name))
            if f.name == "early_stopping" and raw.strip().lower() == "never":
                values[f.name] = "never"
            else:
                values[f.name] = raw.strip().lower() in ("1", "true", "yes") if kind is bool else kind(raw)
    return replace(base, **values)


class OptionError(ValueError):
    """An option value a request may not use; the message is meant for the person who sent it."""


@dataclass(frozen=True)
class GenerationLimits:
    """Upper bounds a deployment accepts (`limit_*` parameters of `preprocess` and `text_decoder`)."""

    max_num_beams: int = 8
    max_new_tokens: int = 64
    max_num_return_sequences: int = 8
    max_no_repeat_ngram_size: int = 16


@dataclass(frozen=True)
class GenerationOptions:
    """One request's options. Defaults follow the BLIP paper's captioning setting (3 beams, 5 to 20 tokens)."""

    num_beams: int = 3
    max_new_tokens: int = 20
    min_new_tokens: int = 5
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    no_repeat_ngram_size: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int | None = None
    # Beam search's stopping rule, as transformers' `early_stopping`: False (its heuristic), True (stop once
    # num_beams captions are finished) or "never". Set by a checkpoint's generation_config.json, not by requests.
    early_stopping: bool | str = False

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def with_values(self, **values: object) -> GenerationOptions:
        """A copy with the given (already typed) values; None means "not set"."""
        # Each of its field's own type, which `replace` cannot check through one dict.
        changes: dict[str, Any] = {k: v for k, v in values.items() if v is not None}
        return replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> GenerationOptions:
        """Options resolved by `preprocess`; raises OptionError for anything else."""
        try:
            values = json.loads(text)
            if not isinstance(values, dict):
                raise TypeError("not an object")
            unknown = set(values) - set(cls.names())
            if unknown:
                raise TypeError(f"unknown options {sorted(unknown)}")
            options = cls(**values)
        except (ValueError, TypeError) as exc:
            raise OptionError(f"GENERATION_OPTIONS is not a JSON object of generation options: {exc}") from None
        for f in fields(cls):
            value = getattr(options, f.name)
            if f.name == "early_stopping":
                if not (value is True or value is False or value == "never"):
                    raise OptionError(f"GENERATION_OPTIONS: early_stopping must be true, false or \"never\", not "
                                      f"{value!r}")
                continue
            if f.name == "seed":
                if value is None:
                    continue
                kind = int
            else:
                kind = type(getattr(cls(), f.name))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(options, f.name, float(value))
            elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise OptionError(f"GENERATION_OPTIONS: {f.name} must be a {kind.__name__}, not {value!r}")
        return options

    @property
    def rows(self) -> int:
        """How many decoder rows this request occupies: its beams, or its independent samples."""
        if self.num_beams > 1:
            return self.num_beams
        return self.num_return_sequences

    def validate(self, limits: GenerationLimits, prompt_tokens: int, max_positions: int) -> None:
        """Raises OptionError naming the first option outside its allowed range."""

        def check(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise OptionError(f"{name}={getattr(self, name)!r} is out of range: allowed {allowed}")

        def in_range(name: str, low: float, high: float) -> None:
            value = getattr(self, name)
            check(name, low <= value <= high and math.isfinite(value), f"{low} to {high}")

        in_range("num_beams", 1, limits.max_num_beams)
        room = min(limits.max_new_tokens, max_positions - prompt_tokens)
        if room < 1:
            raise OptionError(
                f"the prompt is {prompt_tokens} tokens long and leaves no room to generate "
                f"(the model has {max_positions} positions)"
            )
        in_range("max_new_tokens", 1, room)
        in_range("min_new_tokens", 0, self.max_new_tokens)
        in_range("length_penalty", -10.0, 10.0)
        check(
            "repetition_penalty",
            0.0 < self.repetition_penalty <= 10.0 and math.isfinite(self.repetition_penalty),
            "greater than 0 and at most 10",
        )
        if self.num_beams > 1:
            in_range("num_return_sequences", 1, self.num_beams)
        elif self.do_sample:
            in_range("num_return_sequences", 1, limits.max_num_return_sequences)
        else:
            check("num_return_sequences", self.num_return_sequences == 1, "1 for greedy decoding (num_beams=1 "
                  "without do_sample); use beams or sampling for more")
        in_range("no_repeat_ngram_size", 0, limits.max_no_repeat_ngram_size)
        check(
            "temperature",
            0.0 < self.temperature <= 100.0 and math.isfinite(self.temperature),
            "greater than 0 and at most 100",
        )
        in_range("top_k", 0, 1_000_000)
        check("early_stopping", self.early_stopping is True or self.early_stopping is False
              or self.early_stopping == "never", 'true, false or "never"')
        check("top_p", 0.0 < self.top_p <= 1.0, "greater than 0 and at most 1")
        if self.seed is not None:
            in_range("seed", 0, 2**63 - 1)
