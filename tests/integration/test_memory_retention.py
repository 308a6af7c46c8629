"""Large requests leave nothing behind: once they are answered, the server processes that carried their bytes
(the gateway, tritonserver, preprocess) give the memory back. Read as each process's anonymous and shared memory
(/proc/PID/smaps_rollup) at rest, before and after a burst of large images."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from blip_client import CaptionClient


def _large_png(seed: int, side: int = 2000) -> bytes:
    """Noise does not compress: a 2000 x 2000 RGB PNG is about 12 MB, within the 20 MB image limit."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=0)
    return out.getvalue()


def _at_rest(service) -> dict[str, int]:
    """Anonymous + shared memory of each server process (by kind of process), after a moment without calls."""
    time.sleep(3)  # the gateway gives free heap pages back every 2 s
    totals: dict[str, int] = {}
    for name, kinds in service.memory_kinds().items():
        kind = name.rsplit(" (", 1)[0]
        totals[kind] = totals.get(kind, 0) + kinds.get("anon", 0) + kinds.get("shmem", 0)
    return totals


def test_large_images_are_not_kept_once_answered(service):
    images = [_large_png(seed) for seed in range(12)]
    size = len(images[0])
    assert 10 << 20 < size < 20 << 20

    def caption(image: bytes) -> str:
        with CaptionClient(service.address, timeout=300, retry=None) as client:
            return client.caption(image).captions[0].text

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(caption, images[:6]))  # first touches: pools, heaps and arenas take their working size
        before = _at_rest(service)
        list(pool.map(caption, images[6:] * 2))
    after = _at_rest(service)
    grown = {name: (after[name] - before.get(name, 0)) / 2**20 for name in after}
    # Triton's default keeps the request messages of up to 8 finished calls (6 x 12 MB here), a heap without
    # trimming keeps what its busiest moment needed: either shows as six images' worth or more. Under three: at the
    # end of a full suite (this server has served every test before), tritonserver was once seen 24 MB up.
    assert all(growth < 3 * size / 2**20 for growth in grown.values()), (grown, service.triton_log_tail())
