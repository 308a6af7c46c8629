"""Seeded sampling checked against transformers through a running service, with neighbours in the same steps."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from support import reference

SAMPLED = {
    "sample": dict(num_beams=1, do_sample=True, seed=11, temperature=0.8, top_k=12, top_p=0.9,
                   num_return_sequences=2, repetition_penalty=1.2, no_repeat_ngram_size=2, min_new_tokens=1),
    "sample_defaults": dict(num_beams=1, do_sample=True, seed=12),
    "beam_sample": dict(num_beams=3, do_sample=True, seed=13, temperature=1.2, top_p=0.85, num_return_sequences=2),
    "beam_sample_penalties": dict(num_beams=4, do_sample=True, seed=14, top_k=8, repetition_penalty=1.4,
                                  no_repeat_ngram_size=3, length_penalty=0.6),
}
NEIGHBOURS = [dict(), dict(num_beams=5, min_new_tokens=10), dict(num_beams=1, do_sample=True, seed=2),
              dict(num_beams=1, max_new_tokens=3, min_new_tokens=0)]


def sampled_requests_equal_transformers(call, checkpoint: str, kinds: dict, images_used: list[str]) -> None:
    """`call(image, prompt, options)` -> (texts, scores); every sampled request sent together with neighbours."""
    jobs = [(kind, prompt, options, True) for kind in images_used for prompt in (None, "a picture of")
            for options in SAMPLED.values()]
    jobs += [(kind, None, options, False) for kind in images_used for options in NEIGHBOURS] * 2
    jobs.sort(key=lambda job: hash((job[0], str(job[2]))))  # interleave: requests join and leave around each other
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda job: call(kinds[job[0]], job[1], job[2]), jobs))
    checked = 0
    for (kind, prompt, options, sampled), (texts, scores) in zip(jobs, answers, strict=True):
        if not sampled:
            continue
        expected_texts, expected_scores = reference.caption(checkpoint, kinds[kind], prompt, **options)
        assert texts == expected_texts, (kind, prompt, options)
        assert scores == pytest.approx(expected_scores, rel=1e-4, abs=1e-4), (kind, prompt, options)
        checked += 1
    assert checked == len(images_used) * 2 * len(SAMPLED)
