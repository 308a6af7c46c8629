"""Generation options of one caption request, their defaults and the limits a deployment enforces: declared once.

`OPTIONS` declares every option (name, type, default, allowed range, Triton datatype, what it means) and `LIMITS`
every limit a deployment sets. Everything else is derived from them or tested against them: `GenerationOptions`
and `GenerationLimits`, validation, the `default_*` / `limit_*` config parameters (`from_parameters`), the
ensemble's and `preprocess`'s option inputs and parameters (written by blip-export, `blip_server.model_configs`),
the gateway's checks and GetModelInfo's defaults; the proto's `GenerationOptions` and `Limits`, the client SDK,
its CLI and docs/limits.md are held to them by tests/unit/test_option_declaration.py.

Semantics are those of `transformers` `generate()`: the same names, the same meaning. A value outside its
allowed range is refused with a message that names the option and the range, never silently clamped.

`preprocess` resolves a request's options (defaults for what is unset, then validation) and hands them to
`text_decoder` as one JSON tensor, so that the decoder's dynamic batcher sees the same inputs for every
request whichever options they set. `blip-export` copies this file into both models, so the gateway, `preprocess`
and `text_decoder` check options with the same code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

# A value of an option: a scalar, or a tuple of scalars for a repeated (list-valued) option.
OptionValue = bool | int | float | str | tuple[bool | int | float, ...]


@dataclass(frozen=True)
class Limit:
    """An upper bound a deployment sets: the `limit_<name>` parameter of `preprocess` and `text_decoder`, the
    field of the proto's `Limits` of the same name."""

    name: str
    default: int
    doc: str


# Bounds an option's declaration may name as its `high`; `_Bound` for one that depends on other options.
_Bound = Callable[["GenerationOptions", "GenerationLimits"], "tuple[float, str | None]"]


@dataclass(frozen=True)
class Option:
    """One generation option.

    name: transformers' `generate()` argument, the proto field (`optional`, or `repeated`), the JSON key and the
        config parameter `default_<name>`; its Triton tensor is `tensor` (the name in capitals).
    kind: bool, int or float: the type of its value (of each of its values when `repeated`).
    default: what a request that leaves it unset gets (a checkpoint's generation_config.json and the
        `default_<name>` parameters override it); None: unset (a random seed); () for a repeated option.
    dtype: the Triton datatype of its tensor (INT32, INT64, FP32, BOOL); "" for an option requests cannot set
        (it has no tensor and no proto field: early_stopping is the checkpoint's).
    low, high: the allowed range, both included; `high` is a number, `limit_<name>` of a `Limit`, the name of
        an earlier option (whose value bounds it) or a function of the options and limits. `above_low`: low itself
        is refused. `fits_positions`: also at most the positions the prompt leaves in the model.
    choices: the only values allowed, instead of a range (compared with their types: 1 is not True).
    repeated: a list of values (a proto `repeated` field, a tensor of dims [-1], a JSON list); each is checked
        against the range.
    from_checkpoint: whether a checkpoint's generation_config.json may set it (a seed is per request).
    allowed: the range as docs/limits.md says it, where `high` is a function ({limit_<name>} for a limit).
    """

    name: str
    kind: type
    default: Any
    doc: str
    dtype: str = ""
    low: float | None = None
    high: float | str | _Bound | None = None
    above_low: bool = False
    fits_positions: bool = False
    choices: tuple[Any, ...] = ()
    repeated: bool = False
    from_checkpoint: bool = True
    allowed: str = ""

    @property
    def request(self) -> bool:
        """Whether requests set it (the proto field and the Triton tensor exist)."""
        return bool(self.dtype)

    @property
    def tensor(self) -> str:
        return self.name.upper()


def _most_sequences(options: GenerationOptions, limits: GenerationLimits) -> tuple[float, str | None]:
    if options.num_beams > 1:
        return options.num_beams, None
    if options.do_sample:
        return limits.max_num_return_sequences, None
    return 1, "1 for greedy decoding (num_beams=1 without do_sample); use beams or sampling for more"


LIMITS: tuple[Limit, ...] = (
    Limit("max_num_beams", 8, "Largest num_beams."),
    Limit("max_new_tokens", 64, "Largest max_new_tokens."),
    Limit("max_num_return_sequences", 8, "Largest num_return_sequences when sampling."),
    Limit("max_no_repeat_ngram_size", 16, "Largest no_repeat_ngram_size."),
)

# Defaults follow the BLIP paper's captioning setting (3 beams, 5 to 20 new tokens), else transformers'.
OPTIONS: tuple[Option, ...] = (
    Option("num_beams", int, 3, "Beam search width; 1 means greedy decoding (or sampling, with do_sample).",
           dtype="INT32", low=1, high="limit_max_num_beams"),
    Option("max_new_tokens", int, 20, "Most tokens to generate after the prompt.",
           dtype="INT32", low=1, high="limit_max_new_tokens", fits_positions=True),
    Option("min_new_tokens", int, 5, "Fewest tokens to generate after the prompt before the caption may end.",
           dtype="INT32", low=0, high="max_new_tokens"),
    Option("length_penalty", float, 1.0,
           "Exponent of the length normalisation of beam scores; above 1 favours longer captions.",
           dtype="FP32", low=-10.0, high=10.0),
    Option("repetition_penalty", float, 1.0, "Penalty on tokens already in the sequence; 1 is none.",
           dtype="FP32", low=0.0, high=10.0, above_low=True),
    Option("num_return_sequences", int, 1,
           "How many captions to return, best first; at most num_beams with beam search.",
           dtype="INT32", low=1, high=_most_sequences,
           allowed="1 to `num_beams` with beams; 1 to {limit_max_num_return_sequences} when sampling; 1 greedy"),
    Option("no_repeat_ngram_size", int, 0, "No n-gram of this size may occur twice; 0 is off.",
           dtype="INT32", low=0, high="limit_max_no_repeat_ngram_size"),
    Option("do_sample", bool, False, "Sample tokens instead of taking the most likely ones.", dtype="BOOL"),
    Option("temperature", float, 1.0, "Sampling temperature.", dtype="FP32", low=0.0, high=100.0, above_low=True),
    Option("top_k", int, 50, "Sample among the k most likely tokens only; 0 is off.",
           dtype="INT32", low=0, high=1_000_000),
    Option("top_p", float, 1.0, "Sample among the most likely tokens whose probabilities add up to top_p.",
           dtype="FP32", low=0.0, high=1.0, above_low=True),
    Option("seed", int, None, "Seed for sampling: the captions of torch.manual_seed(seed) then generate(); unset: "
           "a random one.", dtype="INT64", low=0, high=2**63 - 1, from_checkpoint=False),
    # Beam search's stopping rule, as transformers' `early_stopping`: False (its heuristic), True (stop once
    # num_beams captions are finished) or "never". Set by a checkpoint's generation_config.json, not by requests.
    Option("early_stopping", bool, False, "Beam search's stopping rule (the checkpoint's): false, true or never.",
           choices=(True, False, "never")),
)

REQUEST_OPTIONS: tuple[Option, ...] = tuple(o for o in OPTIONS if o.request)


class OptionError(ValueError):
    """An option value a request may not use; the message is meant for the person who sent it."""


def _is(value: object, choice: object) -> bool:
    return type(value) is type(choice) and value == choice


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _parse_scalar(kind: type, text: str) -> Any:
    if kind is bool:
        return text.strip().lower() in ("1", "true", "yes")
    return kind(text.strip())


def parse_parameter(option: Option | Limit, raw: str) -> Any:
    """A config parameter's text (`default_<option>`, `limit_<name>`) as the value it states."""
    if isinstance(option, Limit):
        return int(raw.strip())
    for choice in option.choices:
        if isinstance(choice, str) and raw.strip().lower() == choice:
            return choice
    if option.repeated:
        return tuple(_parse_scalar(option.kind, part) for part in raw.split(",") if part.strip())
    return _parse_scalar(option.kind, raw)


def render_parameter(value: object) -> str:
    """The inverse of `parse_parameter`: a value as a config parameter's text."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(render_parameter(v) for v in value)
    return str(value)


_Values_T = TypeVar("_Values_T", bound="_Values")


class _Values:
    """An immutable set of values, one per declaration of `_declared` (read as attributes)."""

    __slots__ = ("_values",)
    _declared: ClassVar[Sequence[Option] | Sequence[Limit]] = ()
    _values: dict[str, Any]

    def __init__(self, **values: Any) -> None:
        unknown = set(values) - set(self.names())
        if unknown:
            raise TypeError(f"unknown {type(self).__name__} fields {sorted(unknown)}")
        object.__setattr__(self, "_values", {d.name: values.get(d.name, d.default) for d in self._declared})

    @classmethod
    def names(cls) -> list[str]:
        return [d.name for d in cls._declared]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return object.__getattribute__(self, "_values")[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}") from None

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: use with_values()")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and isinstance(other, _Values) and other._values == self._values

    def __hash__(self) -> int:
        return hash(tuple(self._values.items()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def __reduce__(self) -> tuple[Any, ...]:
        return _construct, (type(self), dict(self._values))

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def with_values(self: _Values_T, **values: object) -> _Values_T:
        """A copy with the given (already typed) values; None means "not set"."""
        return type(self)(**{**self._values, **{k: v for k, v in values.items() if v is not None}})


def _construct(cls: type[_Values], values: dict[str, Any]) -> _Values:
    return cls(**values)


def from_parameters(cls: type[_Values_T], parameters: Mapping[str, str], prefix: str) -> _Values_T:
    """An instance of `cls` (GenerationOptions, GenerationLimits) whose values are overridden by the config
    parameters `<prefix><name>` that are set (`default_num_beams`, `limit_max_num_beams`, ...)."""
    values = {}
    for declaration in cls._declared:
        raw = parameters.get(prefix + declaration.name)
        if raw:
            values[declaration.name] = parse_parameter(declaration, raw)
    return cls(**values)


class GenerationLimits(_Values):
    """Upper bounds a deployment accepts (`limit_*` parameters of `preprocess` and `text_decoder`): see LIMITS."""

    __slots__ = ()
    _declared = LIMITS


class GenerationOptions(_Values):
    """One request's options, one attribute per declaration of OPTIONS (the defaults where unset)."""

    __slots__ = ()
    _declared = OPTIONS

    def to_json(self) -> str:
        return json.dumps(self._values)

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
        except (ValueError, TypeError) as exc:
            raise OptionError(f"GENERATION_OPTIONS is not a JSON object of generation options: {exc}") from None
        return cls(**{o.name: _typed(o, values[o.name]) for o in cls.options() if o.name in values})

    @classmethod
    def options(cls) -> tuple[Option, ...]:
        """The declarations of its options (OPTIONS; a subclass may declare others)."""
        return tuple(o for o in cls._declared if isinstance(o, Option))

    @property
    def rows(self) -> int:
        """How many decoder rows this request occupies: its beams, or its independent samples."""
        if self.num_beams > 1:
            return int(self.num_beams)
        return int(self.num_return_sequences)

    def validate(self, limits: GenerationLimits, prompt_tokens: int, max_positions: int) -> None:
        """Raises OptionError naming the first option outside its allowed range."""
        for option in self.options():
            value = self._values[option.name]
            if value is None and option.default is None:
                continue
            for item in value if option.repeated else (value,):
                _check(option, item, self, limits, prompt_tokens, max_positions)


def _typed(option: Option, value: object) -> Any:
    """A JSON value as the option's type (an int for a float option becomes a float), or OptionError."""
    if value is None and option.default is None:
        return None
    if option.repeated:
        if not isinstance(value, list):
            raise OptionError(f"GENERATION_OPTIONS: {option.name} must be a list of {option.kind.__name__}, not "
                              f"{value!r}")
        return tuple(_typed_scalar(option, v) for v in value)
    return _typed_scalar(option, value)


def _typed_scalar(option: Option, value: object) -> Any:
    if option.choices:
        if not any(_is(value, c) for c in option.choices):
            raise OptionError(f"GENERATION_OPTIONS: {option.name} must be {_choices(option)}, not {value!r}")
        return value
    if option.kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise OptionError(f"GENERATION_OPTIONS: {option.name}={value} is out of range") from None
    if not isinstance(value, option.kind) or (option.kind is int and isinstance(value, bool)):
        raise OptionError(f"GENERATION_OPTIONS: {option.name} must be a {option.kind.__name__}, not {value!r}")
    return value


def _choices(option: Option) -> str:
    rendered = [json.dumps(c) for c in option.choices]
    return ", ".join(rendered[:-1]) + " or " + rendered[-1]


def _check(option: Option, value: Any, options: GenerationOptions, limits: GenerationLimits, prompt_tokens: int,
           max_positions: int) -> None:
    def refuse(allowed: str) -> None:
        raise OptionError(f"{option.name}={value!r} is out of range: allowed {allowed}")

    if option.choices:
        if not any(_is(value, c) for c in option.choices):
            refuse(_choices(option))
        return
    if option.low is None and option.high is None:
        return
    high: float | None
    allowed: str | None = None
    if callable(option.high):
        high, allowed = option.high(options, limits)
    elif isinstance(option.high, str):
        high = (getattr(limits, option.high[len("limit_"):]) if option.high.startswith("limit_")
                else getattr(options, option.high))
    else:
        high = option.high
    if option.fits_positions:
        room = max_positions - prompt_tokens
        if room < 1:
            raise OptionError(f"the prompt is {prompt_tokens} tokens long and leaves no room to generate "
                              f"(the model has {max_positions} positions)")
        high = room if high is None else min(high, room)
    low = option.low
    ok = isinstance(value, int) or math.isfinite(value)
    if low is not None:
        ok = ok and (value > low if option.above_low else value >= low)
    if high is not None:
        ok = ok and value <= high
    if ok:
        return
    if allowed is None:
        if option.above_low:
            allowed = f"greater than {_number(low)}" + (f" and at most {_number(high)}" if high is not None else "")
        else:
            allowed = f"{low} to {high}"
    refuse(allowed)
