"""Folders of images (blip_client._folders and `blip-caption DIR --output FILE`): the lazy walk, the record files
and their resumption, the bounded number of images in flight, and the CLI interrupted by SIGINT and SIGKILL and run
again, against a gateway whose Triton call is replaced (tests/support/fake_captioner.py). Against the real stack:
tests/integration/test_folder_runs.py."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from blip_client import (
    CaptionError,
    CaptionResult,
    RecordFile,
    RecordsError,
    caption_files,
    caption_folder,
    find_images,
)
from blip_client._types import Caption
from support.fake_captioner import IMAGE, FakeCaptioner
from support.gateway import BackgroundGateway

CLI = str(Path(sys.executable).parent / "blip-caption")


def _tree(root: Path) -> set[str]:
    """A folder tree: images at several depths, other files, a corrupt image; returns the images' paths."""
    images = set()
    for folder in ["", "2023", "2024", "2024/march", "2024/march/day one", "empty"]:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name in ["a.png", "b.PNG", "c.jpg", "2023/d.jpeg", "2024/e.webp", "2024/march/f.png",
                 "2024/march/day one/g,h.png", "2024/march/day one/i.gif", "2023/broken.jpg"]:
        (root / name).write_bytes(IMAGE if "broken" not in name else b"not an image")
        images.add(str(root / name))
    (root / "notes.txt").write_text("not an image")
    (root / "2024" / ".DS_Store").write_bytes(b"\0")
    (root / "2024" / "march" / "video.mp4").write_bytes(b"\0")
    return images


def test_find_images_walks_folders_for_images_and_yields_files_as_given(tmp_path):
    images = _tree(tmp_path / "photos")
    assert sorted(find_images([tmp_path / "photos"])) == sorted(images)
    assert sorted(find_images([f"{tmp_path}/photos/"])) == sorted(images)  # the folder's path normalised
    assert sorted(find_images([tmp_path / "photos"], glob=["2024/*"])) == sorted(
        p for p in images if "/photos/2024/" in p)
    assert sorted(find_images([tmp_path / "photos"], glob=["*.png", "2023/*"])) == sorted(
        p for p in images if p.endswith(".png") or "/2023/" in p)
    assert list(find_images([tmp_path / "photos"], glob=["*.PNG"])) == [str(tmp_path / "photos" / "b.PNG")]
    # Files are yielded as given, whatever their name, and so is a path that does not exist.
    given = [str(tmp_path / "photos" / "notes.txt"), str(tmp_path / "missing.jpg")]
    assert list(find_images(given, glob=["nothing"])) == given


def test_find_images_does_not_follow_symlinked_folders_and_reports_unreadable_ones(tmp_path, monkeypatch):
    from blip_client import _folders

    images = _tree(tmp_path / "photos")
    (tmp_path / "photos" / "loop").symlink_to(tmp_path / "photos")  # a cycle, if it were followed
    (tmp_path / "photos" / "linked.png").symlink_to(tmp_path / "photos" / "a.png")  # a file: followed
    locked = tmp_path / "photos" / "2024" / "locked"
    locked.mkdir()
    (locked / "x.png").write_bytes(IMAGE)
    real_scandir = os.scandir

    def scandir(path):  # what a folder without read permission does (chmod would not stop root)
        if path == str(locked):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(_folders.os, "scandir", scandir)
    errors = []
    found = sorted(find_images([tmp_path / "photos"], on_error=errors.append))
    assert found == sorted(images | {str(tmp_path / "photos" / "linked.png")})
    assert [e.filename for e in errors] == [str(locked)]
    assert sorted(find_images([tmp_path / "photos"])) == found  # without on_error: skipped quietly


def test_find_images_is_lazy(tmp_path, monkeypatch):
    from blip_client import _folders

    for i in range(20):
        (tmp_path / f"folder-{i}").mkdir()
        (tmp_path / f"folder-{i}" / "image.png").write_bytes(IMAGE)
    opened = []
    real_scandir = os.scandir

    def scandir(path):
        opened.append(path)
        return real_scandir(path)

    monkeypatch.setattr(_folders.os, "scandir", scandir)
    walk = find_images([tmp_path])
    assert opened == []
    assert next(walk).endswith("image.png")
    assert len(opened) == 2  # the folder and the one the first image is in: the other 19 are not read yet
    assert len(list(walk)) == 19 and len(opened) == 21


def _result(text="a caption", score=-0.25):
    return CaptionResult([Caption(text, score), Caption(text + " too", score - 1)])


def _failure(code=grpc.StatusCode.UNAVAILABLE, message="the server is down"):
    return CaptionError(message, code)


@pytest.mark.parametrize("name", ["records.jsonl", "records.csv"])
def test_records_parse_with_the_standard_library_and_resume(tmp_path, name):
    path = tmp_path / name
    tricky = 'a "quoted", comma\nand a line break'
    with RecordFile(path) as records:
        assert records.done == set()
        records.write("x/1.png", _result())
        records.write("x/2,π.png", _result(tricky, -1.5))
        records.write("x/3.png", _failure(grpc.StatusCode.INVALID_ARGUMENT, tricky))
    if name.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert [list(r.values()) for r in rows] == [
            ["x/1.png", "a caption", "-0.25", "", ""],
            ["x/2,π.png", tricky.replace("\n", " "), "-1.5", "", ""],
            ["x/3.png", "", "", "INVALID_ARGUMENT", tricky.replace("\n", " ")]]
        assert list(rows[0]) == ["image", "caption", "score", "error_code", "error_message"]
    else:
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert lines == [
            {"image": "x/1.png", "captions": [{"text": "a caption", "score": -0.25},
                                             {"text": "a caption too", "score": -1.25}]},
            {"image": "x/2,π.png", "captions": [{"text": tricky, "score": -1.5},
                                               {"text": tricky + " too", "score": -2.5}]},
            {"image": "x/3.png", "error": {"code": "INVALID_ARGUMENT", "message": tricky}}]
    clean = path.read_bytes()
    # Reopened: the failed image's record is dropped (it will be tried again), the captioned ones are done.
    with RecordFile(path) as records:
        assert records.done == {"x/1.png", "x/2,π.png"}
        records.write("x/3.png", _result("now it works"))
    kept = clean.splitlines(keepends=True)[:-1]
    assert path.read_bytes().splitlines(keepends=True)[:-1] == kept and b"now it works" in path.read_bytes()
    with RecordFile(path) as records:
        assert records.done == {"x/1.png", "x/2,π.png", "x/3.png"}
    with RecordFile(path, overwrite=True) as records:
        assert records.done == set()
    assert len(path.read_bytes().splitlines()) == (1 if name.endswith(".csv") else 0)


@pytest.mark.parametrize("name", ["records.jsonl", "records.csv"])
def test_a_torn_last_line_is_dropped_on_resume(tmp_path, name):
    path = tmp_path / name
    with RecordFile(path) as records:
        records.write("1.png", _result())
        records.write("2.png", _result())
    whole = path.read_bytes()
    # A process killed while writing its third record: any prefix of the line, never a whole one.
    with RecordFile(tmp_path / ("third" + path.suffix)) as third:
        third.write("3.png", _result())
    line = (tmp_path / ("third" + path.suffix)).read_bytes().splitlines(keepends=True)[-1]
    for cut in range(1, len(line)):
        path.write_bytes(whole + line[:cut])
        with RecordFile(path) as records:
            assert records.done == {"1.png", "2.png"}
            records.write("3.png", _result())
        assert path.read_bytes() == whole + line
    assert not list(tmp_path.glob("*.rewriting"))


def test_a_repeated_record_is_kept_once(tmp_path):
    path = tmp_path / "records.jsonl"
    line = json.dumps({"image": "1.png", "captions": [{"text": "t", "score": -1.0}]}) + "\n"
    path.write_text(line * 3)
    with RecordFile(path) as records:
        assert records.done == {"1.png"}
    assert path.read_text() == line


@pytest.mark.parametrize("name, content", [
    ("other.jsonl", '{"image": "1.png", "captions": []}\n{"something": "else"}\n'),
    ("other.jsonl", "not json\n"),
    ("other.csv", "path,caption\n1.png,a caption\n"),
    ("other.csv", "image,caption,score,error_code,error_message\n1.png,too,many,fields,in,this\n"),
])
def test_a_file_that_is_not_a_record_file_is_refused_untouched(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content + "torn")
    with pytest.raises(RecordsError, match="record|header"):
        RecordFile(path)
    assert path.read_text() == content + "torn"
    assert not list(tmp_path.glob("*.rewriting"))


class FakeClient:
    """CaptionClient.caption's interface: answers after a delay that depends on the image; counts calls at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.active = self.most = 0

    def caption(self, data, *, prompt, options, timeout, model):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            time.sleep(data[0] / 1000)
            if data[1:] == b"fail":
                raise CaptionError("refused", grpc.StatusCode.INVALID_ARGUMENT)
            return _result(data[1:].decode())
        finally:
            with self.lock:
                self.active -= 1


@pytest.mark.parametrize("ordered", [False, True])
def test_caption_files_holds_at_most_concurrency_files_and_yields_each_once(tmp_path, ordered):
    paths = []
    for i in range(40):
        paths.append(str(tmp_path / f"{i}.png"))
        Path(paths[-1]).write_bytes(bytes([(i * 7) % 11]) + (b"fail" if i % 9 == 0 else f"image {i}".encode()))
    paths.insert(5, str(tmp_path / "missing.png"))
    taken = []
    yielded = []

    def source():
        for path in paths:
            # Taking a path means reading its file soon: never more than `concurrency` ahead of what was yielded.
            assert len(taken) - len(yielded) < 4
            taken.append(path)
            yield path

    client = FakeClient()
    for path, outcome in caption_files(client, source(), concurrency=4, ordered=ordered):
        yielded.append((path, outcome))
    assert client.most <= 4
    assert sorted(p for p, _ in yielded) == sorted(paths)
    if ordered:
        assert [p for p, _ in yielded] == paths
    outcomes = dict(yielded)
    assert outcomes[str(tmp_path / "missing.png")].code == grpc.StatusCode.NOT_FOUND
    assert outcomes[paths[0]].code == grpc.StatusCode.INVALID_ARGUMENT
    assert outcomes[paths[1]].text == "image 1"


def test_caption_files_stops_sending_when_cancelled(tmp_path):
    paths = []
    for i in range(30):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(bytes([5]) + b"x")
    taken = []

    def source():
        for path in paths:
            taken.append(path)
            yield path

    cancel = threading.Event()
    results = []
    for item in caption_files(FakeClient(), source(), concurrency=3, cancel=cancel):
        results.append(item)
        if len(results) == 5:
            cancel.set()
    assert 5 <= len(results) <= len(taken) <= 5 + 3  # what was sent and had finished is still yielded


class GatedCaptioner(FakeCaptioner):
    """Each image waits for a ticket (`admit`), or for `open()`: the test decides how far a run gets."""

    def __init__(self):
        super().__init__()
        self.tickets = asyncio.Semaphore(0)
        self.opened = asyncio.Event()
        self.waiting = 0

    async def _infer(self, job, *args, **kwargs):
        if not self.opened.is_set():
            self.waiting += 1
            ticket = asyncio.ensure_future(self.tickets.acquire())
            opened = asyncio.ensure_future(self.opened.wait())
            try:
                await asyncio.wait([ticket, opened], return_when=asyncio.FIRST_COMPLETED)
            finally:
                self.waiting -= 1
                for waiter in (ticket, opened):
                    waiter.cancel()
                if ticket.done() and not ticket.cancelled() and opened.done():
                    self.tickets.release()  # both at once: the ticket goes back
        return await super()._infer(job, *args, **kwargs)


@pytest.fixture
def gated():
    captioner = GatedCaptioner()
    gateway = BackgroundGateway(captioner)

    def admit(count):
        async def release():
            for _ in range(count):
                captioner.tickets.release()
        gateway.call(release())

    def open_gate():
        async def release():
            captioner.opened.set()
        gateway.call(release())

    def waiting():
        async def count():
            return captioner.waiting
        return gateway.call(count())

    yield gateway, admit, open_gate, waiting
    open_gate()
    gateway.stop()


def _records(path: Path) -> list[tuple[str, bool]]:
    """(image, captioned) of each record, read with the standard library alone."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return [(row["image"], row["error_code"] == "") for row in csv.DictReader(f)]
    return [(r["image"], "captions" in r) for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())]


def _wait(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("interruption, name", [(signal.SIGINT, "captions.jsonl"), (signal.SIGKILL, "captions.jsonl"),
                                                (signal.SIGINT, "captions.csv"), (signal.SIGKILL, "captions.csv")],
                         ids=["sigint-jsonl", "sigkill-jsonl", "sigint-csv", "sigkill-csv"])
def test_an_interrupted_run_goes_on_where_it_stopped_and_records_every_image_once(tmp_path, gated, interruption,
                                                                                    name):
    gateway, admit, open_gate, waiting = gated
    images = _tree(tmp_path / "photos")
    for i in range(30):
        (tmp_path / "photos" / "2024" / f"many-{i}.png").write_bytes(IMAGE)
        images.add(str(tmp_path / "photos" / "2024" / f"many-{i}.png"))
    output = tmp_path / name
    command = [CLI, "--server", gateway.address, "--concurrency", "4", str(tmp_path / "photos"), "--output",
               str(output)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        admit(12)
        # 12 captioned, 4 more in flight, held; the corrupt image fails in the gateway, if the walk has reached it.
        _wait(lambda: output.exists() and sum(ok for _, ok in _records(output)) == 12 and waiting() == 4,
              "12 captioned, 4 in flight")
        first.send_signal(interruption)
        # With SIGINT, the calls in flight are cancelled: held until the gate opens, they would never end.
        _, stderr = first.communicate(timeout=60)
    finally:
        first.kill()
    before = _records(output)
    failed = len(before) - 12  # 0 or 1
    assert sum(ok for _, ok in before) == 12 and failed in (0, 1) and len({image for image, _ in before}) == len(before)
    if interruption == signal.SIGINT:
        assert first.returncode == 130, stderr
        assert "interrupted" in stderr and f"12 captioned, {failed} failed" in stderr
    else:
        assert first.returncode == -signal.SIGKILL
        # What SIGKILL can leave at worst: a record cut short (here written by hand, as the kill timing cannot
        # choose it). The rerun drops it.
        with open(output, "a", encoding="utf-8") as f:
            f.write('{"image": "' if output.suffix == ".jsonl" else f"{tmp_path}/photos/a.png,a capt")
    open_gate()
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1, again.stderr  # the corrupt image failed again
    after = _records(output)
    captioned = [image for image, ok in after if ok]
    assert sorted(captioned) == sorted(images - {str(tmp_path / "photos" / "2023" / "broken.jpg")})
    assert [image for image, ok in after if not ok] == [str(tmp_path / "photos" / "2023" / "broken.jpg")]
    assert f"{len(images) - 12 - 1} captioned, 1 failed, 12 already captioned" in again.stderr
    assert re.search(rf"{len(images) - 12}/{len(images) - 12} \[[0-9:]+<[0-9:]+, +[0-9.]+image/s", again.stderr), (
        again.stderr)  # the bar: done of the images left, time taken and left, the rate
    # A third run has nothing left but the corrupt image, and --overwrite starts over.
    third = subprocess.run(command + ["--no-progress"], capture_output=True, text=True, timeout=120)
    assert "0 captioned, 1 failed" in third.stderr and sorted(_records(output)) == sorted(after)
    fresh = subprocess.run(command + ["--overwrite"], capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 1 and f"{len(images) - 1} captioned, 1 failed, 0 already" in fresh.stderr
    assert sorted(_records(output)) == sorted(after)


def test_the_sdk_captions_a_folder_into_a_record_file(tmp_path):
    from blip_client import CaptionClient

    images = _tree(tmp_path / "photos")
    gateway = BackgroundGateway(FakeCaptioner())
    try:
        with CaptionClient(gateway.address) as client:
            first = caption_folder(client, [tmp_path / "photos"], tmp_path / "out.jsonl", glob=["2024/*"])
            second = caption_folder(client, [tmp_path / "photos"], tmp_path / "out.jsonl")
    finally:
        gateway.stop()
    in_2024 = {p for p in images if "/photos/2024/" in p}
    assert (first.captioned, first.failed, first.skipped) == (len(in_2024), 0, 0)
    assert (second.captioned, second.failed, second.skipped) == (len(images) - len(in_2024) - 1, 1, len(in_2024))
    assert sorted(image for image, _ in _records(tmp_path / "out.jsonl")) == sorted(images)


def test_the_cli_refuses_what_it_cannot_do(tmp_path):
    def run(*args):
        return subprocess.run([CLI, "--server", "127.0.0.1:1", *args], capture_output=True, text=True, timeout=60)

    assert "--overwrite needs --output" in run("x.png", "--overwrite").stderr
    assert "give one" in run("x.png", "--json", "--output", str(tmp_path / "o.jsonl")).stderr
    assert "one caption" in run("x.png", "--num-return-sequences", "2", "--output", str(tmp_path / "o.csv")).stderr
    (tmp_path / "notes.csv").write_text("my,own\nspreadsheet,data\n")
    refused = run("x.png", "--output", str(tmp_path / "notes.csv"))
    assert refused.returncode == 2 and "header" in refused.stderr
    assert (tmp_path / "notes.csv").read_text() == "my,own\nspreadsheet,data\n"


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


FILES = 100_000
FILE_BYTES = 8192
SAMPLE = 5000  # records: the run stops there, and after the count of every name
BOUND_MIB = 16


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the process's memory from /proc")
def test_walking_a_folder_of_100000_files_keeps_the_cli_memory_flat(tmp_path, gated):
    """The CLI over one folder of 100,000 images (8 KiB each) until the progress bar's count has walked every name
    and 5000 are recorded: its peak memory against the same CLI waiting on a one-image folder grows by less than
    16 MiB, where holding the bytes it read would take 40 MiB and listing the folder's paths first 25 MiB."""
    gateway, admit, open_gate, waiting = gated
    one = tmp_path / "one"
    one.mkdir()
    (one / "0.png").write_bytes(IMAGE)
    many = tmp_path / "many"
    many.mkdir()
    padded = IMAGE + b"\0" * (FILE_BYTES - len(IMAGE))  # a PNG reader stops at IEND: the padding is not read
    for i in range(FILES):
        with open(many / f"{i:06d}.png", "wb") as f:
            f.write(padded)

    def start(folder, output):
        with open(tmp_path / f"{output}.log", "w") as log:  # the child writes to its own copy of the descriptor
            command = [CLI, "--server", gateway.address, str(folder), "--output", str(tmp_path / output)]
            return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log), Path(log.name)

    baseline_run, _ = start(one, "one.jsonl")  # gated: it waits, ready, with its image in flight
    try:
        _wait(lambda: waiting() == 1, "the one image in flight")
        time.sleep(0.5)
        baseline = _rss_kib(baseline_run.pid)
    finally:
        baseline_run.kill()
        baseline_run.wait()
    open_gate()
    run, log = start(many, "many.jsonl")
    samples = []
    try:
        def far_enough():
            samples.append(_rss_kib(run.pid))
            assert run.poll() is None, log.read_text()[-2000:]
            output = tmp_path / "many.jsonl"
            lines = output.read_bytes().count(b"\n") if output.exists() else 0
            return f"/{FILES}" in log.read_text()[-4000:] and lines >= SAMPLE

        _wait(far_enough, f"the count of every name and {SAMPLE} records", timeout=600)
        peak = _rss_kib(run.pid, "VmHWM")
    finally:
        run.kill()
        run.wait()
        shutil.rmtree(many)  # 800 MB
    read = (tmp_path / "many.jsonl").read_bytes().count(b"\n")
    growth_mib = (peak - baseline) / 1024
    assert growth_mib < BOUND_MIB < read * FILE_BYTES / 2**20 / 2, (
        f"peak {peak / 1024:.0f} MiB against {baseline / 1024:.0f} MiB waiting on one image; samples (MiB): "
        f"{[round(s / 1024) for s in samples[:: max(1, len(samples) // 20)]]}")
