"""Option validation: every out-of-range value is refused with the option's name and its allowed range."""

from __future__ import annotations

import pytest
from generation_options import GenerationLimits, GenerationOptions, OptionError, from_parameters

LIMITS = GenerationLimits()


def validate(prompt_tokens=1, max_positions=512, **values):
    GenerationOptions().with_values(**values).validate(LIMITS, prompt_tokens, max_positions)


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(num_beams=0), "num_beams=0 is out of range: allowed 1 to 8"),
        (dict(num_beams=9), "num_beams=9 is out of range: allowed 1 to 8"),
        (dict(max_new_tokens=0), "max_new_tokens=0 is out of range: allowed 1 to 64"),
        (dict(max_new_tokens=65), "max_new_tokens=65 is out of range: allowed 1 to 64"),
        (dict(min_new_tokens=21), "min_new_tokens=21 is out of range: allowed 0 to 20"),
        (dict(min_new_tokens=-1), "min_new_tokens=-1 is out of range"),
        (dict(length_penalty=float("nan")), "length_penalty=nan is out of range: allowed -10.0 to 10.0"),
        (dict(length_penalty=11.0), "length_penalty=11.0 is out of range"),
        (dict(repetition_penalty=0.0), "repetition_penalty=0.0 is out of range: allowed greater than 0"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty=inf is out of range"),
        (dict(num_return_sequences=4), "num_return_sequences=4 is out of range: allowed 1 to 3"),
        (dict(num_beams=1, num_return_sequences=2), "num_return_sequences=2 is out of range: allowed 1 for greedy"),
        (dict(num_beams=1, do_sample=True, num_return_sequences=9),
         "num_return_sequences=9 is out of range: allowed 1 to 8"),
        (dict(no_repeat_ngram_size=17), "no_repeat_ngram_size=17 is out of range: allowed 0 to 16"),
        (dict(temperature=0.0), "temperature=0.0 is out of range: allowed greater than 0 and at most 100"),
        (dict(top_k=-1), "top_k=-1 is out of range"),
        (dict(top_p=0.0), "top_p=0.0 is out of range: allowed greater than 0 and at most 1"),
        (dict(top_p=1.5), "top_p=1.5 is out of range"),
        (dict(seed=-1), "seed=-1 is out of range"),
    ],
)
def test_out_of_range_values_name_the_option_and_its_range(values, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(**values)


def test_valid_values_pass():
    validate()
    validate(num_beams=8, num_return_sequences=8, max_new_tokens=64, min_new_tokens=64, length_penalty=-10.0,
             repetition_penalty=10.0, no_repeat_ngram_size=16, do_sample=True, temperature=100.0, top_k=0, top_p=1.0,
             seed=2**63 - 1)


def test_the_prompt_and_new_tokens_must_fit_the_model_positions():
    validate(prompt_tokens=10, max_positions=30, max_new_tokens=20)
    with pytest.raises(OptionError, match="max_new_tokens=20 is out of range: allowed 1 to 19"):
        validate(prompt_tokens=11, max_positions=30, max_new_tokens=20, min_new_tokens=0)
    with pytest.raises(OptionError, match="leaves no room"):
        validate(prompt_tokens=30, max_positions=30)


def test_defaults_are_the_blip_paper_captioning_setting():
    options = GenerationOptions()
    assert (options.num_beams, options.max_new_tokens, options.min_new_tokens) == (3, 20, 5)
    assert options.rows == 3
    assert GenerationOptions(num_beams=1, do_sample=True, num_return_sequences=4).rows == 4


def test_resolved_options_travel_as_json():
    options = GenerationOptions(num_beams=1, do_sample=True, seed=2**63 - 1, top_p=0.25, length_penalty=-2.0)
    assert GenerationOptions.from_json(options.to_json()) == options
    assert GenerationOptions.from_json(b'{"length_penalty": 2}').length_penalty == 2.0


@pytest.mark.parametrize(
    "text, message",
    [
        (b"[1, 2]", "not a JSON object of generation options"),
        (b"{nope", "not a JSON object of generation options"),
        (b'{"beams": 3}', "unknown options"),
        (b'{"num_beams": "3"}', "num_beams must be a int"),
        (b'{"num_beams": true}', "num_beams must be a int"),
        (b'{"do_sample": 1}', "do_sample must be a bool"),
    ],
)
def test_malformed_json_options_are_refused(text, message):
    with pytest.raises(OptionError, match=message):
        GenerationOptions.from_json(text)


def test_deployment_parameters_override_defaults_and_limits():
    params = {"default_num_beams": "5", "default_do_sample": "true", "limit_max_num_beams": "16", "other": "x"}
    assert from_parameters(GenerationOptions, params, "default_") == GenerationOptions(num_beams=5, do_sample=True)
    assert from_parameters(GenerationLimits, params, "limit_").max_num_beams == 16
