"""`blip-bench run --quick`: the benchmark runs end to end on the demo model (CI's smoke test of it), and what it
reports is consistent: every caption of the service (recorded as the benchmark receives it) equals transformers' own,
computed by the test, and the files are written."""

from __future__ import annotations

import json

import pytest

from blip_bench import benchmark
from blip_bench.cli import main
from blip_server.model_store import demo_checkpoint
from blip_server.shared.cpu_turns import available_cores
from support import reference


def test_the_quick_benchmark_runs_and_the_service_equals_transformers(tmp_path, monkeypatch):
    # The service's answers as the benchmark receives them, row by row (results.json keeps only their share).
    answered: dict[str, list[str]] = {}

    def recording(name, ask, images, concurrency, **extra):
        row, answers = measure(name, ask, images, concurrency, **extra)
        answered[name] = answers
        return row, answers

    measure = benchmark._measure
    monkeypatch.setattr(benchmark, "_measure", recording)
    assert main(["run", "--quick", "--images", "6", "--tokens", "8", "--repeat-share", "0,0.5",
                 "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    # What the name promises, checked here rather than through the benchmark's own comparison: every caption the
    # service returned (both routes, every concurrency) is transformers' own for the same image and settings
    # (the quick run's images, 3 beams, exactly 8 new tokens), computed by the test with transformers.
    checkpoint = str(demo_checkpoint())
    expected = [reference.caption(checkpoint, image, num_beams=3, max_new_tokens=8, min_new_tokens=8)[0][0]
                for image in benchmark._scenes(6)]
    service_rows = [name for name in answered if name.startswith("service fp32 via") and "repeated" not in name]
    assert len(service_rows) == 4
    for name in service_rows:
        assert answered[name] == expected, name
    assert [r["batch"] for r in results["transformers"]] == [1, 4]
    assert results["cpu_threads"] == available_cores()  # transformers' threads: those the service's models start
    # transformers one by one again at the end (how far the machine drifted): the same captions as its first run
    # (transformers against itself: a check of the drift row, not of the service), timed anew
    again = results["transformers_again"]
    assert again["batch"] == 1 and again["identical_share"] == 1.0 and again["seconds"] > 0
    rows = results["service"]["fp32"]["rows"]
    assert {(r["route"], r["concurrency"]) for r in rows} == {
        (route, c) for route in ("gateway", "triton") for c in (1, 4)}
    for row in rows:
        # the benchmark's own comparison agrees with the test's
        assert row["identical_share"] == 1.0 and row["identical_to"] == "transformers"
        assert answered[row["name"]] == expected
        assert row["captions"] == 6 and row["captions_per_second"] > 0
        assert row["models"]["text_decoder"]["executions"] > 0 and row["decoder_floor_s_per_caption"] > 0
        # Triton's statistics cover the measured captions, not the warm-up's (the decoder counts a request again
        # at every step it is handed back for)
        assert row["models"]["preprocess"]["requests"] == row["models"]["vision_encoder"]["requests"] == 6
        # CPU time of the server's processes; the gateway's (blip-serve's own process) is found and is a part of it
        assert row["server_cpu_s_per_caption"] > 0 and 0 <= row["gateway_cpu_share"] < 1
        if row["route"] == "gateway":
            assert 0 < row["gateway_cpu_s_per_caption"] < row["server_cpu_s_per_caption"]
    service = results["service"]["fp32"]
    assert service["weights_bytes"] > 0 and results["memory_bandwidth_gb_s"] > 0
    # The machine's floor, measured first: every measured shape's rate, each backend and precision, and the
    # bandwidth; a caption's floor has an encoder's and a decoder's part (the demo model: 145 tokens, 8 steps)
    floor = results["floor"]
    assert floor["threads"] == available_cores() and floor["memory_bandwidth_gb_s"] == results["memory_bandwidth_gb_s"]
    measured = {(r["shape"], r["backend"], r["precision"]) for r in floor["rates"]}
    shapes = ("qkv", "attention output", "fc1", "fc2")
    assert {(shape, backend, "fp32") for shape in shapes for backend in ("onnxruntime", "torch")} <= measured
    assert {(shape, "onnxruntime", "int8") for shape in shapes} <= measured
    assert all(0 < r["gflop_per_s"] < 1e6 for r in floor["rates"])
    caption = service["floor"]
    assert caption["tokens"] == 8 and caption["encoder_s"] > 0 and caption["decoder_s"] > 0
    assert caption["total_s"] == caption["encoder_s"] + caption["decoder_s"]
    for row in rows:
        assert row["floor_s_per_caption"] == caption["total_s"]
        # The demo model's caption is far above the floor (about 10x in runs here): the floor counts the encoder's
        # products at the best rate measured and one read of the decoder's weights a step, a few milliseconds,
        # and a caption's fixed costs (preprocess, transport) are larger. The decoder alone may beat its part
        # (its 2.8 MB of weights are read from the caches, faster than the memory's bandwidth), and seconds per
        # caption at 4 concurrent may in principle (captions decoded together share their steps' reads): those
        # ratios are only positive.
        assert row["latency_vs_floor"] >= 1
        assert row["throughput_vs_floor"] > 0 and row["encoder_vs_floor"] > 0 and row["decoder_vs_floor"] > 0
        if row["concurrency"] == 1:
            assert row["throughput_vs_floor"] >= 1
        compute = sum(row["models"][m]["compute_s"] for m in row["models"]) / row["captions"]
        # what is not the models' compute: the mean latency less the models' mean compute, which it contains
        assert row["other_s_per_caption"] == pytest.approx(row["mean_ms"] / 1000 - compute)
        assert row["other_s_per_caption"] > 0
    # Memory at rest and at its peak under load, for every server process (the decoder's stub among them).
    assert sum(service["peak_memory"].values()) >= sum(service["memory"].values()) * 0.9 > 0
    assert any(name.startswith("stub text_decoder") for name in service["peak_memory"])
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "results.md").read_text()
    assert "| transformers, batch 1 |" in markdown and "| transformers, batch 1, again at the end |" in markdown
    assert "gateway share" in markdown
    assert "| run | floor s (encoder + decoder) | p50 latency / floor |" in markdown
    assert "| service fp32 via gateway, 1 concurrent | " in markdown.split("p50 latency / floor")[1]
    assert "Measured first" in markdown and "GB/s" in markdown
    # With the response cache: throughput with half the images repeated beside none. One client at a time, every
    # repeat finds its image's answer in the cache; with four, a repeat of an image still in flight is a miss.
    repeats = {(r["repeat_share"], r["concurrency"]): r for r in service["repeat_rows"]}
    assert set(repeats) == {(share, c) for share in (0.0, 0.5) for c in (1, 4)}
    assert all(r["captions"] == 6 and r["captions_per_second"] > 0 for r in repeats.values())
    assert repeats[(0.0, 1)]["cache_hits"] == repeats[(0.0, 4)]["cache_hits"] == 0
    assert repeats[(0.5, 1)]["cache_hits"] == repeats[(0.5, 1)]["cache_misses"] == 3
    assert repeats[(0.5, 4)]["cache_hits"] + repeats[(0.5, 4)]["cache_misses"] == 6
    assert "| service fp32 via gateway, 1 concurrent, 50% repeated | " in markdown and "3 of 6 |" in markdown


def test_the_chaos_mode_kills_each_process_in_turn_and_accounts_for_every_call(tmp_path):
    """`blip-bench chaos`, short: two kills (tritonserver, then the preprocess stub) under load; every call ends
    with its caption, and each outage is seen and timed (detection, recovery, blip-serve's own breakdown)."""
    code = main(["chaos", "--minutes", "0.5", "--concurrency", "2", "--kill-every", "12",
                 "--output", str(tmp_path)])
    summary = json.loads((tmp_path / "chaos.json").read_text())
    assert code == 0, (summary, (tmp_path / "blip-serve.log").read_text()[-4000:])
    assert summary["calls"] > 0 and summary["lost"] == 0 and summary["by_code"] == {"OK": summary["calls"]}
    assert [o["fault"] for o in summary["each_outage"]] == ["tritonserver", "preprocess"]
    for outage in summary["each_outage"]:
        assert outage["detected"] is not None and outage["recovered"] is not None, outage
        assert set(outage["restart"]) == {"total", "stop", "backoff", "start", "reach"}, outage
    assert "| tritonserver | 1 |" in (tmp_path / "chaos.md").read_text()
