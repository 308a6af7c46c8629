"""Triton's response cache through the real stack (blip-serve: the gateway and Triton): a repeated deterministic
request is answered from the cached ensemble (`blip_caption_cached`) without running preprocess, the encoder or the
decoder, with the same captions, and counts as a hit in Triton's statistics and metrics; an unseeded sample is
never a hit, through the gateway or straight to `blip_caption` (which caches nothing); the cache's memory stays
within --response-cache-mb; 0 turns it off."""

from __future__ import annotations

import re
import shutil
import time
from types import SimpleNamespace

import pytest
import tritonclient.grpc as grpcclient

from blip_bench.processes import GatewayProcess, scrape
from blip_client import CaptionClient, GenerationOptions
from blip_server import ensemble
from support import images
from support.serve import ServeProcess

MODELS = ("preprocess", "vision_encoder", "text_decoder")
CACHED = ensemble.CACHED_MODEL


def _picture(seed: int) -> bytes:
    return images.encode(images.rgb(64, 48, seed), "PNG")


def _counts(serve: ServeProcess) -> dict[str, dict[str, int]]:
    """Per model: executions and requests run, and the ensemble's cache hits and misses (Triton's statistics)."""
    client = grpcclient.InferenceServerClient(serve.triton_address)
    counts = {}
    for stats in client.get_inference_statistics(as_json=True)["model_stats"]:
        inference = stats.get("inference_stats", {})
        counts[stats["name"]] = {"executions": int(stats.get("execution_count", 0)),
                                 "requests": int(stats.get("inference_count", 0)),
                                 "hits": int(inference.get("cache_hit", {}).get("count", 0)),
                                 "misses": int(inference.get("cache_miss", {}).get("count", 0))}
    return counts


def _cache_metrics(serve: ServeProcess) -> dict[str, float]:
    """Triton's nv_cache_* samples on its metrics port (the per-model ones for the cached ensemble only)."""
    found = {}
    for (name, labels), value in scrape(serve.ports["metrics"]).items():
        if name.startswith("nv_cache") and dict(labels).get("model", CACHED) == CACHED:
            found[name.removesuffix("_total")] = value  # the parser names counters' samples *_total
    return found


def _caption(client: CaptionClient, image: bytes, options: GenerationOptions) -> list[tuple[str, float]]:
    return [(c.text, c.score) for c in client.caption(image, options=options).captions]


@pytest.fixture(scope="module")
def cached(repositories, tmp_path_factory):
    """blip-serve with its default response cache (no --response-cache-mb given)."""
    serve = ServeProcess("--model", str(repositories["standard"]), cache=tmp_path_factory.mktemp("cache"))
    try:
        serve.wait_ready()
        yield serve
    finally:
        code, log = serve.stop()
    assert code == 0, log


@pytest.mark.parametrize("name, options", [
    ("greedy", GenerationOptions(num_beams=1)),
    ("beam search", GenerationOptions(num_beams=3, num_return_sequences=2)),
    ("seeded sampling", GenerationOptions(do_sample=True, seed=5, num_return_sequences=3)),
])
def test_a_repeated_deterministic_request_is_answered_from_the_cache(cached, name, options):
    image = _picture({"greedy": 1, "beam search": 2, "seeded sampling": 3}[name])
    with CaptionClient(cached.address, timeout=60) as client:
        before = _counts(cached)
        hits_before = _cache_metrics(cached).get("nv_cache_num_hits_per_model", 0)
        first = _caption(client, image, options)
        after_first = _counts(cached)
        second = _caption(client, image, options)
        after_second = _counts(cached)
    assert second == first  # the same captions and scores
    # The first went to the cached ensemble, through every model, and was a miss; the second ran none of them (the
    # gateway sends each call a deadline of its own as a request parameter: it does not enter Triton's key) and was
    # a hit. The uncached ensemble was not asked.
    assert after_first[CACHED]["misses"] == before[CACHED]["misses"] + 1
    for model in MODELS:
        assert after_first[model]["requests"] == before[model]["requests"] + 1, (model, cached.triton_log_tail())
        assert after_second[model] == after_first[model], model
    assert after_second[CACHED]["hits"] == after_first[CACHED]["hits"] + 1
    assert after_second[ensemble.MODEL] == before[ensemble.MODEL]
    assert _cache_metrics(cached)["nv_cache_num_hits_per_model"] == hits_before + 1


def test_triton_native_clients_get_the_cache_from_the_cached_ensemble_only(cached):
    """`blip_caption` caches nothing, even a deterministic request; `blip_caption_cached` caches it."""
    image = _picture(7)
    triton = grpcclient.InferenceServerClient(cached.triton_address)
    before = _counts(cached)
    for model in (ensemble.MODEL, ensemble.MODEL, CACHED, CACHED):
        triton.infer(model, ensemble.inputs(grpcclient, image, None, num_beams=2), outputs=ensemble.outputs(grpcclient))
    after = _counts(cached)
    assert after["vision_encoder"]["requests"] == before["vision_encoder"]["requests"] + 3  # the last was a hit
    assert after[ensemble.MODEL]["hits"] == after[ensemble.MODEL]["misses"] == 0
    assert (after[CACHED]["misses"], after[CACHED]["hits"]) == (before[CACHED]["misses"] + 1,
                                                                before[CACHED]["hits"] + 1)


def test_an_unseeded_sample_is_never_a_hit(cached):
    image = _picture(4)
    options = GenerationOptions(do_sample=True, num_return_sequences=2)
    with CaptionClient(cached.address, timeout=60) as client:
        before = _counts(cached)
        for _ in range(3):
            assert len(_caption(client, image, options)) == 2
        after = _counts(cached)
    # Sent to the uncached ensemble: each ran the models, and the cache was neither asked nor given an entry.
    assert after["vision_encoder"]["requests"] == before["vision_encoder"]["requests"] + 3
    assert after[ensemble.MODEL]["requests"] == before[ensemble.MODEL]["requests"] + 3
    assert after[CACHED] == before[CACHED]
    # A Triton-native client sending the same unseeded request to `blip_caption` twice: sampled twice, no hit.
    triton = grpcclient.InferenceServerClient(cached.triton_address)
    for _ in range(2):
        triton.infer(ensemble.MODEL, ensemble.inputs(grpcclient, image, None, do_sample=True),
                     outputs=ensemble.outputs(grpcclient))
    last = _counts(cached)
    assert last["vision_encoder"]["requests"] == after["vision_encoder"]["requests"] + 2
    assert last[ensemble.MODEL]["hits"] == 0 and last[CACHED] == after[CACHED]


def test_with_no_cache_every_request_runs_the_models(service):
    """The shared `service` runs with --response-cache-mb 0 (conftest.py)."""
    image = _picture(5)
    options = GenerationOptions(num_beams=1)
    with CaptionClient(service.address, timeout=60) as client:
        before = _counts(service)
        assert _caption(client, image, options) == _caption(client, image, options)
        after = _counts(service)
    assert after["vision_encoder"]["requests"] == before["vision_encoder"]["requests"] + 2
    assert after[CACHED]["requests"] == before[CACHED]["requests"] + 2  # a deterministic request: the cached one
    assert after[CACHED]["hits"] == after[CACHED]["misses"] == 0
    # No cache: the cached ensemble's counters (its config enables the cache) stay at 0, the gauges are absent.
    metrics = _cache_metrics(service)
    assert metrics["nv_cache_num_hits_per_model"] == metrics["nv_cache_num_misses_per_model"] == 0
    assert "nv_cache_util" not in metrics and "nv_cache_num_entries" not in metrics
    assert re.search(r"\| cache_enabled +\| 0 ", service.triton_log_text())


def _settled_metrics(serve: ServeProcess, lookups: int) -> dict[str, float]:
    """The cache's gauges read by Triton's metrics thread (every 2 s) once `lookups` lookups were made and each
    answer they missed was inserted: a reading taken while the last request ran counts its lookup (made before
    the models run) but not its insertion (after), seen under load as 77 entries + 72 evictions for 150 misses."""
    deadline = time.monotonic() + 30
    while True:
        metrics = _cache_metrics(serve)
        inserted = metrics.get("nv_cache_num_entries", 0) + metrics.get("nv_cache_num_evictions", 0)
        if metrics.get("nv_cache_num_lookups", 0) >= lookups and inserted >= metrics.get("nv_cache_num_misses", 0):
            return metrics
        if time.monotonic() > deadline:
            return metrics  # the test's assertions say what is missing
        time.sleep(0.5)


def test_the_caches_memory_is_bounded_by_its_flag(repositories, tmp_path):
    """16 KiB holds about a hundred one-caption answers (some 160 bytes each, measured): 150 different requests
    fill it, the oldest answers are evicted, and its use stays within its size."""
    sent = 150
    serve = ServeProcess("--model", str(repositories["standard"]), "--response-cache-mb", str(16 / 1024),
                         cache=tmp_path / "cache")
    try:
        serve.wait_ready()
        image = _picture(6)
        with CaptionClient(serve.address, timeout=120) as client:
            for seed in range(sent):  # one at a time: inserted in this order
                client.caption(image, options=GenerationOptions(do_sample=True, seed=seed))
            metrics = _settled_metrics(serve, sent)
            assert metrics["nv_cache_num_lookups"] == metrics["nv_cache_num_misses"] == sent, metrics
            assert 0 < metrics["nv_cache_num_entries"] < sent and metrics["nv_cache_num_evictions"] > 0, metrics
            assert metrics["nv_cache_num_entries"] + metrics["nv_cache_num_evictions"] == sent, metrics
            assert 0.5 < metrics["nv_cache_util"] <= 1.0, metrics
            before = _counts(serve)
            client.caption(image, options=GenerationOptions(do_sample=True, seed=sent - 1))  # the newest: kept
            newest = _counts(serve)
            client.caption(image, options=GenerationOptions(do_sample=True, seed=0))  # the oldest: evicted
            oldest = _counts(serve)
        assert newest[CACHED]["hits"] == before[CACHED]["hits"] + 1
        assert newest["vision_encoder"] == before["vision_encoder"]
        assert oldest[CACHED]["misses"] == newest[CACHED]["misses"] + 1
        assert oldest["vision_encoder"]["requests"] == newest["vision_encoder"]["requests"] + 1
    finally:
        code, log = serve.stop()
    assert code == 0, log
    assert re.search(r"\| cache_enabled +\| 1 ", serve.triton_log_text())


def test_a_gateway_in_front_of_an_older_export_keeps_unseeded_samples_out_of_its_only_cache(repositories, tmp_path,
                                                                                          start_triton):
    """A replica exported before the cached ensemble (one `blip_caption`, cached) behind this gateway: the gateway
    finds no cached ensemble (Triton answers NOT_FOUND for its config), sends everything to `blip_caption`, and
    gives an unseeded sample a random seed of its own, so that it is never a hit."""
    older = tmp_path / "older"
    shutil.copytree(repositories["standard"], older)
    shutil.rmtree(older / CACHED)
    config = older / ensemble.MODEL / "config.pbtxt"
    config.write_text(config.read_text() + "response_cache { enable: true }\n")
    triton = start_triton(older, response_cache_mb=1)
    gateway = GatewayProcess("--triton", f"127.0.0.1:{triton.options.grpc_port}")
    serve = SimpleNamespace(triton_address=f"127.0.0.1:{triton.options.grpc_port}")
    try:
        gateway.wait_ready(timeout=60)
        image = _picture(8)
        with CaptionClient(gateway.address, timeout=60) as client:
            before = _counts(serve)
            first = _caption(client, image, GenerationOptions(num_beams=2))
            assert _caption(client, image, GenerationOptions(num_beams=2)) == first
            deterministic = _counts(serve)
            for _ in range(3):
                client.caption(image, options=GenerationOptions(do_sample=True))
            sampled = _counts(serve)
    finally:
        code, log = gateway.stop()
    assert code == 0, log
    assert CACHED not in sampled
    assert (deterministic[ensemble.MODEL]["hits"], deterministic[ensemble.MODEL]["misses"]) == (
        before[ensemble.MODEL]["hits"] + 1, before[ensemble.MODEL]["misses"] + 1)
    assert sampled[ensemble.MODEL]["hits"] == deterministic[ensemble.MODEL]["hits"]  # every sample a miss
    assert sampled["vision_encoder"]["requests"] == deterministic["vision_encoder"]["requests"] + 3
