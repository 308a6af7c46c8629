"""Our batched decoder against BlipForConditionalGeneration.generate, in process, on the same image embeddings."""

from __future__ import annotations

import pytest
import torch
from blip_text_decoder import BlipTextDecoder, DecoderConfig, _padded_columns
from caption_generation import generate
from generation_options import GenerationOptions

from blip_server.checkpoint import decoder_config
from support import reference

CASES = {
    "greedy": dict(num_beams=1, min_new_tokens=0),
    "greedy_min_new_tokens": dict(num_beams=1, min_new_tokens=6),
    "beams_3_defaults": dict(),
    "beams_5_return_3": dict(num_beams=5, num_return_sequences=3),
    "length_penalty_2": dict(num_beams=3, length_penalty=2.0, min_new_tokens=0),
    "length_penalty_negative": dict(num_beams=4, length_penalty=-1.0, min_new_tokens=0),
    "repetition_penalty_beams": dict(num_beams=3, repetition_penalty=1.5),
    "repetition_penalty_greedy": dict(num_beams=1, repetition_penalty=1.3, min_new_tokens=0),
    "no_repeat_ngram_greedy": dict(num_beams=1, no_repeat_ngram_size=2, min_new_tokens=0),
    "no_repeat_ngram_beams": dict(num_beams=4, no_repeat_ngram_size=2, max_new_tokens=12, min_new_tokens=8),
    "one_new_token": dict(num_beams=2, max_new_tokens=1, min_new_tokens=0),
    "long": dict(num_beams=3, max_new_tokens=30, min_new_tokens=0),
    "early_stopping_true": dict(num_beams=4, early_stopping=True, min_new_tokens=0),
    "early_stopping_never": dict(num_beams=3, early_stopping="never", length_penalty=1.5, min_new_tokens=0,
                                 max_new_tokens=15),
    "early_stopping_never_negative_penalty": dict(num_beams=3, early_stopping="never", length_penalty=-0.5),
}
PROMPTS = [None, "a picture of"]
IMAGES = 3


@pytest.fixture(scope="module", params=["standard", "unusual"])
def setup(request, checkpoints):
    path = str(checkpoints[request.param])
    model, processor = reference.load(path)
    pixels = torch.randn(IMAGES, 3, *_size(processor),
                         generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        embeds = model.vision_model(pixel_values=pixels).last_hidden_state
    decoder = BlipTextDecoder(DecoderConfig(**decoder_config(model.config.text_config)),
                              model.text_decoder.state_dict())
    return path, processor, pixels, embeds, decoder


def _size(processor):
    return processor.image_processor.size.height, processor.image_processor.size.width


def _prompt_ids(processor, decoder, prompt):
    ids = processor.tokenizer(prompt)["input_ids"] if prompt is not None else [0, 0]
    return [decoder.config.bos_token_id] + ids[1:-1]


def _reference(path, processor, pixels, i, prompt, options, **extra):
    inputs = {"pixel_values": pixels[i : i + 1]}
    if prompt is not None:
        inputs.update(processor.tokenizer(prompt, return_tensors="pt"))
        inputs.pop("token_type_ids", None)
    return reference.generate(path, inputs, **options, **extra)


def test_captions_and_scores_equal_transformers(setup):
    path, processor, pixels, embeds, decoder = setup
    endings = set()
    for name, case in CASES.items():
        options = GenerationOptions().with_values(**case)
        for prompt in PROMPTS:
            for i in range(IMAGES):
                texts, scores = _reference(path, processor, pixels, i, prompt, case)
                ours = generate(decoder, embeds[i : i + 1], [_prompt_ids(processor, decoder, prompt)], [options])[0]
                assert [processor.decode(h.tokens, skip_special_tokens=True) for h in ours] == texts, (name, prompt, i)
                assert [h.score for h in ours] == pytest.approx(scores, rel=1e-6, abs=1e-4), (name, prompt, i)
                endings.update(h.tokens[-1] == decoder.config.eos_token_id for h in ours)
    # The matrix exercises both ways a caption ends: the end token, and the length limit.
    assert endings == {True, False}


def test_a_mixed_batch_decodes_each_item_as_if_alone(setup):
    path, processor, pixels, embeds, decoder = setup
    items = [(i % IMAGES, prompt, GenerationOptions().with_values(**case))
             for i, (case, prompt) in enumerate((c, p) for c in CASES.values() for p in PROMPTS)]
    batch = generate(
        decoder,
        torch.stack([embeds[i] for i, _, _ in items]),
        [_prompt_ids(processor, decoder, p) for _, p, _ in items],
        [o for _, _, o in items],
    )
    for (i, prompt, options), together in zip(items, batch, strict=True):
        alone = generate(decoder, embeds[i : i + 1], [_prompt_ids(processor, decoder, prompt)], [options])[0]
        assert [h.tokens for h in together] == [h.tokens for h in alone]
        assert [h.score for h in together] == pytest.approx([h.score for h in alone], rel=1e-6, abs=1e-5)


def test_sampling_is_reproducible_per_seed_whatever_the_batch(setup):
    _, processor, _, embeds, decoder = setup
    bos = [decoder.config.bos_token_id]
    sample = GenerationOptions(num_beams=1, do_sample=True, seed=7, num_return_sequences=3, temperature=1.5,
                               min_new_tokens=0)
    alone = generate(decoder, embeds[:1], [bos], [sample])[0]
    neighbours = [GenerationOptions(), GenerationOptions(num_beams=1, do_sample=True, seed=8, top_p=0.8)]
    together = generate(decoder, embeds, [bos] * 3, [sample, *neighbours])[0]
    assert [h.tokens for h in alone] == [h.tokens for h in together]
    assert len(alone) == 3
    other_seeds = [generate(decoder, embeds[:1], [bos], [sample.with_values(seed=s)])[0] for s in range(8, 12)]
    assert any([h.tokens for h in o] != [h.tokens for h in alone] for o in other_seeds)


def test_sampling_with_top_k_1_is_greedy(setup):
    _, _, _, embeds, decoder = setup
    bos = [[decoder.config.bos_token_id]] * IMAGES
    greedy = generate(decoder, embeds, bos, [GenerationOptions(num_beams=1, min_new_tokens=0)] * IMAGES)
    sampled = generate(decoder, embeds, bos, [
        GenerationOptions(num_beams=1, min_new_tokens=0, do_sample=True, top_k=1, num_return_sequences=2, seed=s)
        for s in range(IMAGES)
    ])
    for g, s in zip(greedy, sampled, strict=True):
        assert [h.tokens for h in s] == [g[0].tokens] * 2


def test_cancelled_items_leave_the_batch(setup):
    """What the served model does when a request is cancelled or its deadline passes (text_decoder/1/model.py,
    tested through it in test_text_decoder_model.py): DecodeLoop.cancel mid-way; the others decode on unchanged."""
    from caption_generation import DecodeLoop

    _, _, _, embeds, decoder = setup
    bos = [decoder.config.bos_token_id]
    options = GenerationOptions(min_new_tokens=10)
    loop = DecodeLoop(decoder, columns=32)
    for i in range(IMAGES):
        loop.add(i, embeds[i], bos, options)
    results = {}
    for _ in range(4):
        results.update(loop.step())
    assert 1 in loop.requests
    loop.cancel(1)
    assert 1 not in loop.requests
    while len(loop):
        results.update(loop.step())
    assert sorted(results) == [0, 2]
    expected = generate(decoder, embeds, [bos] * IMAGES, [options] * IMAGES)
    assert [[h.tokens for h in results[i]] for i in (0, 2)] == [[h.tokens for h in expected[i]] for i in (0, 2)]


@pytest.fixture(params=["fresh_memory", "dirty_memory"])
def memory(request, monkeypatch):
    """dirty_memory: every uninitialised tensor starts as NaN, as recycled memory may (a masked attention
    weight of 0 times a NaN is still NaN, so a cache that reads such memory is wrong only on some machines)."""
    if request.param == "dirty_memory":
        empty, empty_like = torch.empty, torch.empty_like
        monkeypatch.setattr(torch, "empty", lambda *a, **k: _nan_filled(empty(*a, **k)))
        monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _nan_filled(empty_like(*a, **k)))
    return request.param


def _nan_filled(tensor):
    return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor


def test_requests_joining_and_leaving_a_running_loop_decode_as_if_alone(setup, memory):
    """In flight: requests join at different steps (taking slots others left, widening the rows per slot when
    a request with more beams arrives, lengthening the cache's columns when one with a longer sequence does) and
    leave as they finish; each gets what it gets alone."""
    from caption_generation import DecodeLoop

    _, processor, _, embeds, decoder = setup
    plan = [  # (step at which it joins, image, prompt, options)
        (0, 0, None, GenerationOptions(num_beams=1, min_new_tokens=0, max_new_tokens=4)),
        (0, 1, "a picture of", GenerationOptions(num_beams=3, min_new_tokens=8, max_new_tokens=12)),
        (1, 2, None, GenerationOptions(num_beams=1, do_sample=True, seed=3, num_return_sequences=2, top_p=0.9)),
        (3, 0, "a picture of", GenerationOptions(num_beams=5, num_return_sequences=2, no_repeat_ngram_size=2)),
        (5, 1, None, GenerationOptions(num_beams=3, do_sample=True, seed=11, repetition_penalty=1.4)),
        (6, 2, None, GenerationOptions(num_beams=1, min_new_tokens=2, max_new_tokens=3)),
        (14, 0, None, GenerationOptions()),
    ]
    loop = DecodeLoop(decoder, columns=64)
    results, step, width_seen, columns_seen = {}, 0, set(), set()
    while step <= max(p[0] for p in plan) or len(loop):
        for key, (at, image, prompt, options) in enumerate(plan):
            if at == step:
                loop.add(key, embeds[image], _prompt_ids(processor, decoder, prompt), options)
        results.update(loop.step())
        width_seen.add(loop.cache.width)
        columns_seen.add(loop.cache.columns)
        step += 1
    assert width_seen >= {3, 5} and sorted(results) == list(range(len(plan)))
    assert len(columns_seen) > 1 and max(columns_seen) <= 64  # grown while others were in flight
    for key, (_, image, prompt, options) in enumerate(plan):
        alone = generate(decoder, embeds[image : image + 1], [_prompt_ids(processor, decoder, prompt)], [options])[0]
        assert [h.tokens for h in results[key]] == [h.tokens for h in alone], key
        assert [h.score for h in results[key]] == pytest.approx([h.score for h in alone], rel=1e-6, abs=1e-5)


def test_a_slot_left_by_a_cancelled_request_is_reused_cleanly(setup):
    from caption_generation import DecodeLoop

    _, processor, _, embeds, decoder = setup
    bos = [decoder.config.bos_token_id]
    options = GenerationOptions(num_beams=2, min_new_tokens=6, max_new_tokens=6, repetition_penalty=1.3)
    loop = DecodeLoop(decoder, columns=32)
    loop.add("a", embeds[0], bos, options)
    loop.add("b", embeds[1], bos, options)
    for _ in range(3):
        assert loop.step() == {}
    loop.cancel("a")
    loop.add("c", embeds[2], bos, options)  # takes a's slot, whose rows held a's tokens
    results = {}
    while len(loop):
        results.update(loop.step())
    assert sorted(results) == ["b", "c"]
    for key, image in (("b", 1), ("c", 2)):
        alone = generate(decoder, embeds[image : image + 1], [bos], [options])[0]
        assert [h.tokens for h in results[key]] == [h.tokens for h in alone]


def test_an_idle_loop_gives_its_cache_back_and_the_next_requests_decode_as_if_alone(setup):
    from caption_generation import DecodeLoop

    _, processor, _, embeds, decoder = setup
    bos = [decoder.config.bos_token_id]
    options = GenerationOptions(num_beams=3, min_new_tokens=5, max_new_tokens=5)
    loop = DecodeLoop(decoder, columns=64)
    # BOS and 5 new tokens: 6 columns, padded to what attention reads (blip_text_decoder._COLUMNS), not the 64 the
    # loop allows
    needed = _padded_columns(6, decoder.config.head_size)
    assert needed < 64
    for round_ in range(2):
        for image in range(3):
            loop.add((round_, image), embeds[image], bos, options)
        results = {}
        while len(loop):
            results.update(loop.step())
            if len(loop):
                assert loop.cache.rows >= 9 and loop.cache.image_keys and loop.cache.columns == needed
        assert loop.cache.rows == 0 and loop.cache.kv.numel() == 0 and not loop.cache.image_keys  # given back
        for image in range(3):
            alone = generate(decoder, embeds[image : image + 1], [bos], [options])[0]
            assert [h.tokens for h in results[(round_, image)]] == [h.tokens for h in alone]


SAMPLING = {  # a seed means what it means in transformers: torch.manual_seed(seed) before generate()
    "sample": dict(num_beams=1, do_sample=True, seed=5, temperature=0.7, top_k=20, top_p=0.9, min_new_tokens=2,
                   num_return_sequences=2, repetition_penalty=1.2, no_repeat_ngram_size=2),
    "sample_plain": dict(num_beams=1, do_sample=True, seed=6, min_new_tokens=0),
    "beam_sample": dict(num_beams=3, do_sample=True, seed=7, temperature=1.3, top_k=0, top_p=0.8,
                        num_return_sequences=2),
    "beam_sample_penalties": dict(num_beams=4, do_sample=True, seed=8, repetition_penalty=1.5, no_repeat_ngram_size=2,
                                  length_penalty=0.5, max_new_tokens=12),
}


def test_seeded_sampling_and_beam_sampling_equal_transformers_whatever_shares_the_loop(setup):
    """Each sampled request equals torch.manual_seed(seed) + generate(do_sample=True) for its image alone, while
    requests with other options and seeds join and leave the loop around it."""
    from caption_generation import DecodeLoop

    path, processor, pixels, embeds, decoder = setup
    plan = []
    for k, case in enumerate(SAMPLING.values()):
        for prompt in PROMPTS:
            plan.append((len(plan) % 3, k % IMAGES, prompt, case))  # (joining step, image, prompt, options)
    neighbours = [(1, 1, None, dict(num_beams=5)), (2, 2, "a picture of", dict(num_beams=1, do_sample=True, seed=99)),
                  (0, 0, None, dict(num_beams=1, min_new_tokens=0, max_new_tokens=3))]
    everything = plan + neighbours
    loop = DecodeLoop(decoder, columns=64)
    results, step = {}, 0
    while step <= 2 or len(loop):
        for key, (at, image, prompt, case) in enumerate(everything):
            if at == step:
                loop.add(key, embeds[image], _prompt_ids(processor, decoder, prompt),
                         GenerationOptions().with_values(**case))
        results.update(loop.step())
        step += 1
    for key, (_, image, prompt, case) in enumerate(plan):
        texts, scores = _reference(path, processor, pixels, image, prompt, case)
        ours = results[key]
        assert [processor.decode(h.tokens, skip_special_tokens=True) for h in ours] == texts, (case, prompt)
        assert [h.score for h in ours] == pytest.approx(scores, rel=1e-5, abs=1e-4), (case, prompt)
