"""A CSV file that rows are appended to one at a time, each on disk before the next: what a crash or a full disk
leaves behind is the header and whole rows, never half of one."""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


class MetricsWriteError(OSError):
    """A row could not be written (e.g. a full disk); the rows written before it are still in the file."""


class DurableCsv:
    """Appends rows to `path` with plain `os.write` calls (no Python buffer that would retry a failed write at
    close), fsyncs after each row, and on a failed write truncates the file back to its last whole row."""

    def __init__(self, path: Path, columns: Iterable[str], append: bool = True):
        self.path, self.columns = path, list(columns)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
        try:
            self._fd = os.open(path, flags, 0o644)
        except OSError as err:
            raise MetricsWriteError(f"could not open {path}: {err}") from err
        self._size = os.fstat(self._fd).st_size  # where the last whole row ends
        if self._size == 0:
            self._append(_csv_line(self.columns))

    def write(self, row: Mapping[str, Any]) -> None:
        """`row`'s values for `columns` (others are ignored, missing ones left empty), on disk when this returns."""
        self._append(_csv_line([row.get(column, "") for column in self.columns]))

    def _append(self, text: str) -> None:
        data = text.encode()
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)
        except OSError as err:
            with contextlib.suppress(OSError):  # freeing blocks: works on a full disk
                os.ftruncate(self._fd, self._size)
            raise MetricsWriteError(f"could not write {self.path}: {err}") from err
        self._size += len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _csv_line(values: list[Any]) -> str:
    line = io.StringIO()
    csv.writer(line).writerow(values)  # the dialect csv.DictWriter uses: quoting where needed, "\r\n"
    return line.getvalue()
