"""Large requests leave nothing behind: once they are answered, the server processes that carried their bytes
(the gateway, tritonserver, preprocess) give the memory back. Read as each process's anonymous and shared memory
(/proc/PID/smaps_rollup) at rest after each of several rounds of large images: what no round's work explains is
growth in every round."""

from __future__ import annotations

import io
import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from blip_client import CaptionClient

IMAGES_PER_ROUND, ROUNDS = 6, 4  # ROUNDS compared after a warm-up round
# The gateway gives its heaps' free pages back every 2 s (GatewayServer._return_free_memory): at rest is when no
# process's memory has moved by more than STILL_BYTES over a longer span than that.
STILL_SECONDS, STILL_BYTES = 2.5, 1 << 20


def _large_png(seed: int, side: int = 2000) -> bytes:
    """Noise does not compress: a 2000 x 2000 RGB PNG is about 12 MB, within the 20 MB image limit."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=0)
    return out.getvalue()


def _reading(service) -> dict[str, int]:
    """Anonymous + shared memory of each server process, by kind of process."""
    totals: dict[str, int] = {}
    for name, kinds in service.memory_kinds().items():
        kind = name.rsplit(" (", 1)[0]
        totals[kind] = totals.get(kind, 0) + kinds.get("anon", 0) + kinds.get("shmem", 0)
    return totals


def _at_rest(service) -> dict[str, int]:
    """The reading once it has stopped moving (the calls are answered, the gateway has trimmed its heaps)."""
    still, since, deadline = _reading(service), time.monotonic(), time.monotonic() + 120
    while time.monotonic() - since < STILL_SECONDS:
        assert time.monotonic() < deadline, f"the servers' memory never came to rest: {still}"
        time.sleep(0.25)
        now = _reading(service)
        if any(abs(now[name] - still.get(name, 0)) > STILL_BYTES for name in now):
            still, since = now, time.monotonic()
    return still


def test_large_images_are_not_kept_once_answered(service):
    size = len(_large_png(0))
    assert 10 << 20 < size < 20 << 20
    seeds = itertools.count()

    def caption(image: bytes) -> str:
        with CaptionClient(service.address, timeout=300, retry=None) as client:
            return client.caption(image).captions[0].text

    levels = []
    with ThreadPoolExecutor(max_workers=IMAGES_PER_ROUND) as pool:
        for _ in range(1 + ROUNDS):  # new images every round: nothing is answered from anything kept
            list(pool.map(caption, [_large_png(next(seeds)) for _ in range(IMAGES_PER_ROUND)]))
            levels.append(_at_rest(service))
    grown = {name: [round((after[name] - before.get(name, 0)) / 2**20, 1)
                    for before, after in itertools.pairwise(levels)] for name in levels[-1]}
    # The first round sets the working size of pools, heaps and arenas; each later round may raise a high-water
    # mark again (its busiest moment held more at once than any before: Triton keeps the request messages of up
    # to 8 finished calls, a heap without trimming what its busiest moment needed), so a round's growth alone
    # says nothing. What keeps a part of the requests grows by it in every round; so every process must have a
    # round in which it grew by less than half an image.
    assert all(min(growth) < size / 2**21 for growth in grown.values()), (grown, service.triton_log_tail())
