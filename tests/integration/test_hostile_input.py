"""Hostile and unusual files through the real stack, in one concurrent burst with good images: each hostile file
gets its own error code, each unusual valid file and every good image the caption transformers gives it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from blip_bench.corpus import CAPTION, Sample, corpus
from blip_client import CaptionClient, CaptionError
from support import images, reference

GOOD = {f"good_{kind}": Sample(data, CAPTION) for kind, data in images.kinds(seed=71).items()
        if kind in ("jpeg", "png", "webp", "tiff", "jpeg_exif_rotate_90", "large")}


def test_a_burst_of_hostile_unusual_and_good_files_gets_exactly_the_right_answers(service):
    samples = {**corpus(seed=7), **GOOD}
    assert sum(s.hostile for s in samples.values()) >= 25 and sum(not s.hostile for s in samples.values()) >= 20

    def send(item):
        name, sample = item
        with CaptionClient(service.address, timeout=300, retry=None) as client:
            try:
                return name, client.caption(sample.data).captions[0].text
            except CaptionError as error:
                return name, error

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = dict(pool.map(send, sorted(samples.items(), key=lambda item: hash(item[0]))))

    wrong = {}
    for name, sample in samples.items():
        answer = answers[name]
        if sample.hostile:
            if not (isinstance(answer, CaptionError) and answer.code.name == sample.expected):
                wrong[name] = (sample.expected, answer)
        else:
            expected = reference.caption(service.checkpoint, sample.data)[0][0]
            if answer != expected:
                wrong[name] = (expected, answer)
    assert not wrong, wrong
    messages = {name: answers[name].message for name, sample in samples.items() if sample.hostile}
    assert "60000000x1; the limit is 20000 pixels a side" in messages["png_line_60000000x1"]
    assert "8000x8000 = 64000000 pixels; the limit is 50000000" in messages["png_bomb_64_megapixels"]
    assert "could not decode the PNG image" in messages["png_corrupt_crc"]  # found by preprocess, not the header
    assert "Traceback" not in " ".join(messages.values())


def test_the_soak_command_accounts_for_every_call(service, tmp_path):
    """A few seconds of `blip-bench soak` against the running service (the full soak is run by hand)."""
    import json

    from blip_bench.cli import main

    assert main(["soak", "--server", service.address, "--minutes", "0.1", "--concurrency", "4", "--hostile", "0.3",
                 "--warmup", "0", "--output", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "soak.json").read_text())["summary"]
    assert summary["calls"] > 10 and summary["lost"] == 0 and summary["unexpected"] == 0
    assert summary["by_code"]["OK"] > 0 and summary["by_code"]["INVALID_ARGUMENT"] > 0
    assert "lost 0, unexpected codes 0" in (tmp_path / "soak.md").read_text()


def test_the_soak_reads_memory_at_rest_after_the_warm_up_and_at_the_end(service):
    """The retained-memory figures are read with no call in flight (the gateway's own gauge says so), the load
    resumes after the first, and the pause does not shorten the load."""
    from blip_bench.soak import soak

    def memory():  # each reading carries the gauge's value as a pseudo-process of that many bytes
        return {**service.memory(), "in flight": int(service.metrics()[("blip_gateway_in_flight_requests", ())])}

    minutes = 0.12
    report = soak(service.address, memory, minutes=minutes, concurrency=6, hostile_share=0.2, warmup=4,
                  settle=0.5, memory_kinds=service.memory_kinds)
    summary = report.summary()
    assert summary["lost"] == 0 and summary["unexpected"] == 0
    assert [r["processes"]["in flight"] for r in report.at_rest] == [0, 0]
    assert max(r["processes"]["in flight"] for r in report.pss) > 0  # the gauge does see the load
    first_rest, last_rest = (r["t"] for r in report.at_rest)
    assert any(first_rest < r["t"] for r in report.pss)  # loaded again after the first reading at rest
    assert last_rest >= minutes * 60 + 0.5  # the pause came on top of the load's time
    rest = summary["at_rest"]
    assert set(rest["kinds"]) == {"anon", "shmem", "file"} and rest["kinds"]["anon"]["end_mb"] > 0
    assert any(name.startswith("stub text_decoder") for name in rest["processes"])
