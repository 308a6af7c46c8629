"""Captioning many files: folders walked lazily, a bounded number of images in flight, and a record file (JSON Lines,
or CSV) written as results arrive, which a rerun resumes.

    from blip_client import CaptionClient, caption_folder

    with CaptionClient("127.0.0.1:50051") as client:
        summary = caption_folder(client, ["photos"], "captions.jsonl", glob=["2024/*"], concurrency=16)

Memory: at most `concurrency` images' bytes are held at once (a file is read only when a call slot is free); a
folder is walked one entry at a time (one open directory per level), never listed; resuming holds the set of the
record file's captioned paths (strings: about 100 bytes plus the path each, ~150 MB for a million).
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from typing import IO, Union

import grpc

from blip_client._client import CaptionClient
from blip_client._errors import CaptionError
from blip_client._requests import DEFAULT, Default
from blip_client._types import CaptionResult, GenerationOptions

# The extensions of the formats the service opens (JPEG, PNG, WebP, GIF, BMP, TIFF), compared in lower case.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
CSV_COLUMNS = ("image", "caption", "score", "error_code", "error_message")
# Names outside UTF-8 (os.fsdecode's surrogates) are written back as their own bytes, and read so again.
_ENCODING_ERRORS = "surrogateescape"

PathInput = Union[str, "os.PathLike[str]"]
Outcome = CaptionResult | CaptionError


def find_images(roots: Iterable[PathInput], *, glob: Sequence[str] = (),
                on_error: Callable[[OSError], None] | None = None) -> Iterator[str]:
    """The images to caption, lazily. A root that is a folder is walked recursively, in directory order (symlinked
    folders are not followed), for the files with an image extension whose path inside the folder (with `/`)
    matches one of the `glob` patterns (fnmatch, case-sensitive, `*` also crosses `/`; none given: every image);
    each is yielded as the folder's normalised path joined with its own. Any other root is yielded as given (a
    file of any name, or a path that will fail as NOT_FOUND). A folder that cannot be read goes to `on_error`
    (default: skipped) and the walk goes on.
    """
    for given in roots:
        root = os.fspath(given)
        if os.path.isdir(root):
            top = os.path.normpath(root)
            yield from _walk(top, len(os.path.join(top, "")), tuple(glob), on_error)
        else:
            yield root


def _walk(top: str, prefix: int, glob: tuple[str, ...],
          on_error: Callable[[OSError], None] | None) -> Iterator[str]:
    def failed(error: OSError) -> None:
        if on_error is not None:
            on_error(error)

    stack: list[os._ScandirIterator[str]] = []  # typeshed's name for what os.scandir returns
    try:
        stack.append(os.scandir(top))
    except OSError as error:
        failed(error)
        return
    try:
        while stack:
            try:
                entry = next(stack[-1], None)
            except OSError as error:
                failed(error)
                entry = None
            if entry is None:
                stack.pop().close()
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(os.scandir(entry.path))
                    continue
                if not entry.is_file():
                    continue
            except OSError as error:
                failed(error)
                continue
            if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and _matches(entry.path[prefix:], glob):
                yield entry.path
    finally:
        for entries in stack:
            entries.close()


def _matches(relative: str, glob: tuple[str, ...]) -> bool:
    if not glob:
        return True
    relative = relative.replace(os.sep, "/")
    return any(fnmatch.fnmatchcase(relative, pattern) for pattern in glob)


def _caption_path(client: CaptionClient, path: str, prompt: str, options: GenerationOptions | None,
                  timeout: float | Default | None, model: str) -> Outcome:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return CaptionError(f"cannot read {path}: {exc.strerror}", grpc.StatusCode.NOT_FOUND)
    try:
        return client.caption(data, prompt=prompt, options=options, timeout=timeout, model=model)
    except CaptionError as error:
        return error


def caption_files(client: CaptionClient, paths: Iterable[PathInput], *, prompt: str = "",
                  options: GenerationOptions | None = None, timeout: float | Default | None = DEFAULT,
                  model: str = "", concurrency: int = 8, ordered: bool = False,
                  cancel: threading.Event | None = None) -> Iterator[tuple[str, Outcome]]:
    """Caption image files, yielding (path, result or CaptionError) as they finish (`ordered`: in the order of
    `paths`), each captioned as `client.caption(..., model=model)` would. A failure is yielded, never raised: an
    unreadable file is NOT_FOUND, a failed call its own code.

    At most `concurrency` files are in flight, and `paths` is consumed only as slots free up, so it may be a lazy
    walk of millions of files (find_images): a file is read when its call starts, and its bytes are dropped when
    it finishes. Setting `cancel` (or closing this generator) stops sending: what has finished is still yielded,
    calls in flight are left to finish on their own (close the client to cancel them).
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    finished: queue.SimpleQueue[Future[Outcome]] = queue.SimpleQueue()
    pending: dict[Future[Outcome], str] = {}  # in the order sent
    source = iter(paths)
    poll = None if cancel is None else 0.1
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="blip-caption")
    try:
        exhausted = False
        while True:
            while not exhausted and len(pending) < concurrency and not (cancel is not None and cancel.is_set()):
                try:
                    given = next(source)
                except StopIteration:
                    exhausted = True
                    break
                path = os.fspath(given)
                future = pool.submit(_caption_path, client, path, prompt, options, timeout, model)
                pending[future] = path
                if not ordered:
                    future.add_done_callback(finished.put)
            if not pending:
                return
            stopping = cancel is not None and cancel.is_set()
            if ordered:
                head = next(iter(pending))
                if not stopping:
                    wait_for([head], timeout=poll)
                if head.done():
                    yield pending.pop(head), head.result()
                elif stopping:
                    return
            else:
                try:
                    done = finished.get(timeout=poll) if not stopping else finished.get_nowait()
                except queue.Empty:
                    if stopping:
                        return
                    continue
                yield pending.pop(done), done.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class RecordsError(Exception):
    """An output file that is not a blip-caption record file (or not one of this format)."""


def _fields(outcome: Outcome) -> tuple[str, str, str, str]:
    if isinstance(outcome, CaptionError):
        return "", "", outcome.code.name, outcome.message
    best = outcome.captions[0]
    return best.text, repr(best.score), "", ""


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


class RecordFile:
    """A file of caption records, one per image, appended and flushed as they are written: JSON Lines, or CSV
    when its name ends in `.csv`.

    JSON Lines: {"image": PATH, "captions": [{"text": ..., "score": ...}, ...]} (best first) or
    {"image": PATH, "error": {"code": CODE, "message": ...}}. CSV: a header, then `image,caption,score,error_code,
    error_message` per image, with the best caption, one line per record (line breaks in a field become spaces).

    Opening an existing file resumes it: `done` is the set of its images that have captions. A torn last line (a
    process killed while writing it), failed images' records and repeated records are dropped first (the file is
    rewritten beside itself and renamed over it), so that failed images are tried again and end with one record
    each. `overwrite` starts a new file. A file that is not such a record file raises RecordsError.
    """

    def __init__(self, path: PathInput, *, overwrite: bool = False) -> None:
        self.path = os.fspath(path)
        self.csv = self.path.lower().endswith(".csv")
        self.done: set[str] = set()
        if not overwrite and os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            self.done, clean = self._scan()
            if not clean:
                self.done = self._rewrite()
            self._file = self._open("a")
        else:
            self._file = self._open("w")
            if self.csv:
                self._file.write(self._header())
                self._file.flush()

    def _open(self, mode: str) -> IO[str]:
        return open(self.path, mode, encoding="utf-8", errors=_ENCODING_ERRORS, newline="")

    def __enter__(self) -> RecordFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def write(self, image: str, outcome: Outcome) -> None:
        """Append one image's record, flushed to the OS before this returns."""
        if self.csv:
            line = self._csv_line((image, *_fields(outcome)))
        else:
            record: dict[str, object] = {"image": image}
            if isinstance(outcome, CaptionError):
                record["error"] = {"code": outcome.code.name, "message": outcome.message}
            else:
                record["captions"] = [{"text": c.text, "score": c.score} for c in outcome.captions]
            line = json.dumps(record, ensure_ascii=False) + "\n"
        self._file.write(line)
        self._file.flush()

    @staticmethod
    def _csv_line(fields: Sequence[str]) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow([_one_line(f) for f in fields])
        return buffer.getvalue()

    def _header(self) -> str:
        return self._csv_line(CSV_COLUMNS)

    def _records(self) -> Iterator[tuple[str, str, bool] | None]:
        """(line, image, captioned) per complete record, None for the header; a torn last line ends it."""
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    return
                line = raw.decode("utf-8", _ENCODING_ERRORS)
                if self.csv and number == 1:
                    if line != self._header():
                        raise RecordsError(f"{self.path}: its first line is not the header {','.join(CSV_COLUMNS)}")
                    yield None
                    continue
                image, captioned = self._parse(line, number)
                yield line, image, captioned

    def _parse(self, line: str, number: int) -> tuple[str, bool]:
        where = f"{self.path}, line {number}, is not a blip-caption record (another file, or use --overwrite)"
        if self.csv:
            rows = list(csv.reader([line]))
            if len(rows) != 1 or len(rows[0]) != len(CSV_COLUMNS):
                raise RecordsError(where)
            return rows[0][0], rows[0][3] == ""
        try:
            record = json.loads(line)
        except ValueError:
            raise RecordsError(where) from None
        if not (isinstance(record, dict) and isinstance(record.get("image"), str)
                and ("captions" in record or "error" in record)):
            raise RecordsError(where)
        return record["image"], "captions" in record

    def _scan(self) -> tuple[set[str], bool]:
        """The captioned images, and whether the file is clean (no torn line, failure or repeat)."""
        done: set[str] = set()
        for item in self._records():
            if item is None:
                continue
            _, image, captioned = item
            if not captioned or image in done:
                return done, False
            done.add(image)
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        return done, not torn

    def _rewrite(self) -> set[str]:
        kept: set[str] = set()
        partial = self.path + ".rewriting"
        try:
            with open(partial, "w", encoding="utf-8", errors=_ENCODING_ERRORS, newline="") as out:
                if self.csv:
                    out.write(self._header())
                for item in self._records():
                    if item is None:
                        continue
                    line, image, captioned = item
                    if captioned and image not in kept:
                        kept.add(image)
                        out.write(line)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            os.unlink(partial)
            raise
        os.replace(partial, self.path)
        return kept


@dataclass(frozen=True)
class FolderSummary:
    """What caption_folder did: images captioned and failed in this run, and skipped (already captioned)."""

    captioned: int
    failed: int
    skipped: int


def caption_folder(client: CaptionClient, roots: Iterable[PathInput], output: PathInput, *,
                   glob: Sequence[str] = (), overwrite: bool = False, prompt: str = "",
                   options: GenerationOptions | None = None, timeout: float | Default | None = DEFAULT,
                   model: str = "", concurrency: int = 8,
                   on_error: Callable[[OSError], None] | None = None) -> FolderSummary:
    """Caption the images of `roots` (find_images: folders walked, files as given) into the record file `output`
    (RecordFile: JSON Lines, or CSV by its extension), each record written as its result arrives. Images the file
    already has captions for are skipped (`overwrite`: start a new file); failures are recorded with their code
    and the run goes on, and a rerun tries them again. `blip-caption DIR --output FILE` is this.
    """
    with RecordFile(output, overwrite=overwrite) as records:
        skipped = captioned = failed = 0

        def todo() -> Iterator[str]:
            nonlocal skipped
            for path in find_images(roots, glob=glob, on_error=on_error):
                if path in records.done:
                    skipped += 1
                else:
                    yield path

        for path, outcome in caption_files(client, todo(), prompt=prompt, options=options, timeout=timeout,
                                           model=model, concurrency=concurrency):
            records.write(path, outcome)
            if isinstance(outcome, CaptionError):
                failed += 1
            else:
                captioned += 1
    return FolderSummary(captioned, failed, skipped)
