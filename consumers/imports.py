"""An import's input: NDJSON and CSV records with their line numbers and offsets, and NDJSON cut into chunks."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

__all__ = ["InputError", "Record", "chunk_ranges", "csv_records", "ndjson_records"]

_CSV_COLUMNS = frozenset({"type", "source", "id", "subject", "time", "data"})
# What chunk_ranges reads at a time.
_READ_BLOCK_BYTES = 1 << 20


class InputError(Exception):
    """The input cannot be imported at all (a CSV without a usable header): the job fails with this message."""


@dataclass(frozen=True, slots=True)
class Record:
    """One input line (one CSV record): its number, the input offset after it, and its event or error."""

    line: int
    end: int
    fields: dict[str, Any] | None
    error: str | None = None


def ndjson_records(handle: BinaryIO, offset: int, line: int, max_line: int) -> Iterator[Record]:
    """The lines after ``offset`` (``line`` lines before it), each parsed to a JSON object or refused."""
    handle.seek(offset)
    while raw := handle.readline(max_line + 1):
        offset += len(raw)
        line += 1
        if len(raw) > max_line and not raw.endswith(b"\n"):
            # Skip the rest of the overlong line without holding it.
            while (rest := handle.readline(max_line)) and not rest.endswith(b"\n"):
                offset += len(rest)
            offset += len(rest)
            yield Record(line, offset, None, f"the line is longer than {max_line} bytes")
            continue
        if not raw.strip():
            yield Record(line, offset, None)
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            yield Record(line, offset, None, f"not valid JSON: {exc}")
            continue
        if not isinstance(obj, dict):
            yield Record(line, offset, None, f"an event must be a JSON object, not {type(obj).__name__}")
            continue
        yield Record(line, offset, obj)


class _LineCounter:
    """Feeds ``csv.reader`` decoded lines while counting the lines and bytes it took."""

    def __init__(self, handle: BinaryIO, offset: int, line: int, max_line: int) -> None:
        self.handle, self.offset, self.line, self.max_line = handle, offset, line, max_line
        self.undecodable = False

    def __iter__(self) -> Iterator[str]:
        while raw := self.handle.readline(self.max_line + 1):
            self.offset += len(raw)
            self.line += 1
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                self.undecodable = True
                yield raw.decode("utf-8", errors="replace")


def _csv_header(handle: BinaryIO, max_line: int) -> tuple[list[str], int]:
    handle.seek(0)
    counter = _LineCounter(handle, 0, 0, max_line)
    header = next(csv.reader(counter), None)
    if header is None:
        raise InputError("the CSV file is empty; its first line must name the columns")
    header = [name.strip() for name in header]
    unknown = sorted(set(header) - _CSV_COLUMNS)
    if unknown or "type" not in header or len(set(header)) != len(header):
        raise InputError(f"the CSV header must name distinct columns among {', '.join(sorted(_CSV_COLUMNS))}, "
                         f"type among them (unknown: {', '.join(unknown) or 'none'})")
    return header, counter.offset


def csv_records(handle: BinaryIO, offset: int, line: int, max_line: int) -> Iterator[Record]:
    """The records after ``offset`` (past the header), as fields named by the header, or refused."""
    header, header_end = _csv_header(handle, max_line)
    if offset < header_end:
        offset, line = header_end, 1
    handle.seek(offset)
    counter = _LineCounter(handle, offset, line, max_line)
    previous = line
    for row in csv.reader(counter):
        # A quoted field may span lines: the record is numbered by its first.
        first_line, previous = previous + 1, counter.line
        undecodable, counter.undecodable = counter.undecodable, False
        if undecodable:
            yield Record(first_line, counter.offset, None, "the record is not valid UTF-8")
        elif not row:
            yield Record(first_line, counter.offset, None)
        elif len(row) != len(header):
            yield Record(first_line, counter.offset, None,
                          f"the record has {len(row)} fields, the header {len(header)}")
        else:
            fields: dict[str, Any] = {name: value for name, value in zip(header, row, strict=True) if value != ""}
            try:
                if "data" in fields:
                    fields["data"] = orjson.loads(fields["data"])
            except orjson.JSONDecodeError as exc:
                yield Record(first_line, counter.offset, None, f"the data column is not valid JSON: {exc}")
                continue
            yield Record(first_line, counter.offset, fields)


def chunk_ranges(path: Path, chunk_bytes: int) -> list[tuple[int, int, int]]:
    """``(start, end, lines before start)`` of ranges of about ``chunk_bytes``, each ending on a line end.

    One pass counting newlines, a block at a time: a gigabyte takes about a second, in flat memory.
    """
    ranges: list[tuple[int, int, int]] = []
    start = start_lines = offset = lines = 0
    with open(path, "rb") as handle:
        while block := handle.read(_READ_BLOCK_BYTES):
            position = 0
            # The first newline at or after the range's size, in this block, ends the range.
            while (search := max(start + chunk_bytes - 1 - offset, position)) < len(block):
                newline = block.find(b"\n", search)
                if newline < 0:
                    break
                lines += block.count(b"\n", position, newline + 1)
                ranges.append((start, offset + newline + 1, start_lines))
                start, start_lines, position = offset + newline + 1, lines, newline + 1
            lines += block.count(b"\n", position)
            offset += len(block)
    if offset > start:
        ranges.append((start, offset, start_lines))
    return ranges
