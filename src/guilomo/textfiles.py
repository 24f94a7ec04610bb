"""User-supplied text files (data, configs, templates) are UTF-8; anything else is an error
that names the file and says what to do, instead of Python's bare "'utf-8' codec can't
decode byte 0xff"."""

from __future__ import annotations

import codecs
import os
from pathlib import Path

# UTF-32 LE first: its mark starts with the UTF-16 LE one.
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))  # fmt: skip


def decode_utf8(
    data: bytes, where: str, *, head: bytes | None = None, error: type[ValueError] = ValueError
) -> str:
    """`data` as UTF-8 text, a byte-order mark dropped; else `error` naming `where`, the byte
    and a UTF-16/32 mark seen at the start of `head` (the file's first bytes; default `data`)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = data if head is None else head
        kind = next((name for mark, name in _BOMS if start.startswith(mark)), None)
        looks = f": looks like {kind}" if kind else ""
        raise error(
            f"{where}: not UTF-8 text (byte 0x{data[exc.start]:02x} at position {exc.start}"
            f"{looks}); save it as UTF-8"
        ) from None


def read_text(path: str | os.PathLike, *, error: type[ValueError] = ValueError) -> str:
    """The text of a UTF-8 file, or `error` naming the file (see `decode_utf8`)."""
    return decode_utf8(Path(path).read_bytes(), str(path), error=error)
