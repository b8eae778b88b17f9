"""Atomic file writes: a crash never leaves a half-written result behind."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_open(path: os.PathLike | str, mode: str = "w", **kwargs) -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success it is fsynced and renamed over ``path``.

    On an exception the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: os.PathLike | str, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_bytes(path: os.PathLike | str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: os.PathLike | str, obj: Any, indent: int | None = None) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)


def atomic_torch_save(obj: Any, path: os.PathLike | str) -> None:
    """``torch.save`` through a temporary file and a rename."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def iter_json_array(path: os.PathLike | str, block_size: int = 10000, read_bytes: int = 1 << 22,
                    max_item_chars: int = 1 << 28) -> Iterator[list]:
    """Stream the elements of a top-level JSON array from a file, ``block_size`` at a time.

    Memory holds one block of elements and one read buffer (``read_bytes`` characters, more while one
    element spans reads, up to ``max_item_chars``), never the whole file: a multi-GB COCO results list
    can be consumed this way.

    Raises:
        ValueError: the file is not a JSON array, or it is malformed or truncated (message names the file
            and the character offset).
    """
    decoder = json.JSONDecoder()
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        buf, pos, offset, eof = "", 0, 0, False

        def fill() -> bool:
            nonlocal buf, pos, offset, eof
            more = f.read(read_bytes)
            if not more:
                eof = True
                return False
            offset += pos
            buf, pos = buf[pos:] + more, 0
            return True

        def skip_space() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not fill():
                    return

        skip_space()
        if pos >= len(buf) or buf[pos] != "[":
            raise ValueError(f"{path}: expected a JSON array (a list of results)")
        pos += 1
        block: list = []
        first = True
        while True:
            skip_space()
            if pos >= len(buf):
                raise ValueError(f"{path}: truncated JSON array (no closing ']')")
            if buf[pos] == "]":
                break
            if not first:
                if buf[pos] != ",":
                    raise ValueError(f"{path}: expected ',' or ']' at character {offset + pos}")
                pos += 1
                skip_space()
            # a number cut by the buffer's end ("2.5e" of "2.5e-3") would decode as a shorter number: keep a margin
            # longer than any JSON number we write
            while len(buf) - pos < 64 and fill():
                pass
            while True:
                try:
                    item, end = decoder.raw_decode(buf, pos)
                    # a number or literal cut at the buffer's end still decodes: make sure something follows
                    if end == len(buf) and not eof and fill():
                        continue
                    break
                except json.JSONDecodeError as e:
                    # no element is that large: stop instead of reading a malformed file to its end
                    if eof or len(buf) - pos > max_item_chars or not fill():
                        raise ValueError(f"{path}: malformed JSON at character {offset + e.pos}: {e.msg}") from None
            block.append(item)
            pos = end
            first = False
            if len(block) >= block_size:
                yield block
                block = []
        if block:
            yield block
