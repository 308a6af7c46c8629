"""Prompt ids and caption text agree with transformers' tokenizer, BlipProcessor and generate()."""

from __future__ import annotations

import random

import pytest
from caption_text import CaptionDecoder
from prompt_tokens import PromptError, PromptTokenizer

from blip_server.checkpoint import decoder_config
from support import reference

PROMPTS = ["a picture of", "", "   ", "A Picture OF", "a photo of two dogs, sitting!", "unknownword of the sky's",
           "naïve café 🙂", "a\tpicture\nof"]


@pytest.fixture(scope="module", params=["standard", "unusual"])
def checkpoint(request, checkpoints, repositories):
    model, processor = reference.load(str(checkpoints[request.param]))
    return model, processor, repositories[request.param]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_ids_are_what_generate_feeds_the_decoder(checkpoint, prompt):
    model, processor, repository = checkpoint
    bos = model.config.text_config.bos_token_id
    tokenizer = PromptTokenizer(repository / "preprocess" / "1" / "tokenizer.json", bos, max_tokens=64)
    input_ids = processor(text=prompt, return_tensors="pt")["input_ids"]
    input_ids[:, 0] = bos  # what BlipForConditionalGeneration.generate does before decoding
    assert tokenizer(prompt) == input_ids[0, :-1].tolist()


def test_no_prompt_is_bos_alone_and_long_prompts_are_refused(checkpoint):
    model, _, repository = checkpoint
    bos = model.config.text_config.bos_token_id
    tokenizer = PromptTokenizer(repository / "preprocess" / "1" / "tokenizer.json", bos, max_tokens=4)
    assert tokenizer(None) == [bos]
    with pytest.raises(PromptError, match="the prompt is 6 tokens long; the limit is 4"):
        tokenizer("a picture of a dog")


def test_caption_text_is_what_the_processor_decodes(checkpoint):
    model, processor, repository = checkpoint
    config = decoder_config(model.config.text_config)
    decode = CaptionDecoder(repository / "text_decoder" / "1" / "tokenizer.json",
                            processor.tokenizer.clean_up_tokenization_spaces)
    rng = random.Random(0)
    sequences = [[config["bos_token_id"]] + [rng.randrange(config["vocab_size"]) for _ in range(rng.randrange(1, 25))]
                 + [config["eos_token_id"]] for _ in range(300)]
    assert decode(sequences) == processor.batch_decode(sequences, skip_special_tokens=True)


@pytest.mark.parametrize("clean_up", [True, False])
def test_clean_up_tokenization_spaces_follows_the_tokenizer_setting(checkpoint, clean_up):
    _, processor, repository = checkpoint
    decode = CaptionDecoder(repository / "text_decoder" / "1" / "tokenizer.json", clean_up)
    ids = processor.tokenizer("a dog, sitting. of the sky's!", add_special_tokens=False)["input_ids"]
    expected = processor.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=clean_up)
    assert decode([ids]) == [expected]
    assert (expected == "a dog, sitting. of the sky's!") == clean_up
