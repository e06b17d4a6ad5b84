"""Text files as other tools write them: byte-order marks, UTF-16, line endings, quoting.

Spreadsheet programs and Windows tools write a UTF-8 byte-order mark (BOM) or
"Unicode text" (UTF-16 with a BOM); other tools write CRLF or CR line endings,
quote fields, or leave blank lines and trailing tabs. :func:`read_text` decodes
every such file to the same ``str`` as the clean UTF-8 file (the encoding is
chosen from the BOM, ``utf-8-sig`` otherwise); :func:`read_tsv` parses a
tab-separated table with pandas (``read_csv`` with ``dtype=str``), so that every
layout variant gives the same table. Defects raise the caller's error type
(:class:`mmssl.errors.DataError` or :class:`~mmssl.errors.ConfigError`) with one
line naming the file and, where there is one, the line.

Source: the Unicode BOM table (UTF-8 ``EF BB BF``, UTF-16 ``FF FE``/``FE FF``,
UTF-32 ``FF FE 00 00``/``00 00 FE FF``); pandas ``read_csv`` documentation.
"""
from __future__ import annotations

import codecs
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd

from mmssl.errors import DataError

# Longest first: the UTF-32 LE mark starts with the UTF-16 LE one.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def detect_encoding(head: bytes) -> str:
    """The codec for a file starting with ``head``: from its BOM, else ``utf-8-sig``."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name
    return "utf-8-sig"


def read_text(path: str | Path, error: type[Exception] = DataError) -> str:
    """The file's text, BOM removed, whatever its Unicode encoding form (UTF-8/16/32 with a BOM).

    Raises ``error`` (one line naming the file) when it cannot be read, is UTF-16/32
    without a BOM (NUL bytes), or is not valid text in its encoding (naming the line
    and the offending byte, e.g. a Latin-1 ``é``).
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise error(f"{p}: no such file") from None
    except IsADirectoryError:
        raise error(f"{p}: is a directory, not a file") from None
    except OSError as e:
        raise error(f"{p}: cannot read file ({e.strerror})") from None
    enc = detect_encoding(raw[:4])
    if enc == "utf-8-sig" and b"\x00" in raw[:4096]:
        raise error(f"{p}: contains NUL bytes (UTF-16/UTF-32 text without a byte-order mark?); "
                    f"save it as UTF-8")
    try:
        return raw.decode(enc)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        label = "UTF-8" if enc == "utf-8-sig" else enc.upper()
        raise error(f"{p}: line {line}: not valid {label} text (byte 0x{raw[e.start]:02x}); "
                    f"save the file as UTF-8") from None


def read_tsv(path: str | Path, required: tuple[str, ...]) -> tuple[pd.DataFrame, np.ndarray]:
    """A tab-separated table with a header line, as strings: ``(table, line numbers)``.

    ``table`` has the ``required`` columns (whitespace-stripped ``str`` values, other
    columns dropped) and one row per non-blank data line; ``line numbers`` (int64,
    ``[n_rows]``) are the 1-based file lines of those rows. Header names are matched
    after stripping spaces and quotes; fields may be quoted. A line with a missing
    required field, too many fields, or a header lacking a required column raises
    :class:`DataError` naming the file and the line.
    """
    p = Path(path)
    text = read_text(p)
    lines = text.splitlines()
    if not lines or not text.strip():
        raise DataError(f"{p}: empty file (expected a header with {', '.join(required)})")
    if not lines[0].strip():
        raise DataError(f"{p}: line 1: empty header line (expected {', '.join(required)})")
    try:
        df = pd.read_csv(io.StringIO(text), sep="\t", dtype=str, keep_default_na=False,
                         skip_blank_lines=False, engine="c")
    except pd.errors.ParserError as e:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if m:
            raise DataError(f"{p}: line {m[2]}: expected {m[1]} tab-separated fields, found {m[3]}") from None
        raise DataError(" ".join(f"{p}: cannot parse as tab-separated text ({e})".split())) from None
    header = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in header]
    if missing:
        hint = ""
        if "\t" not in lines[0] and ("," in lines[0] or ";" in lines[0] or " " in lines[0].strip()):
            hint = "; the header has no tab: the file must be tab-separated"
        else:
            near = [h for h in header for c in missing if h.lower() == c.lower()]
            if near:
                hint = f"; column names are case-sensitive ({', '.join(near)} found)"
        raise DataError(f"{p}: missing column(s) {', '.join(missing)} in header "
                        f"(found: {', '.join(header)}){hint}")
    strip = df.apply(lambda col: col.str.strip())
    blank = (strip == "").all(axis=1).to_numpy()
    table = strip.iloc[:, [header.index(c) for c in required]]
    table.columns = list(required)
    table = table[~blank].reset_index(drop=True)
    line_no = np.flatnonzero(~blank).astype(np.int64) + 2  # header is line 1; no multi-line fields
    empty = (table == "").to_numpy()
    if empty.any():
        k, c = np.argwhere(empty)[0]
        n = int(line_no[k])
        found = len(lines[n - 1].split("\t")) if n - 1 < len(lines) else 0
        if found < len(header):
            raise DataError(f"{p}: line {n}: expected {len(header)} tab-separated fields, found {found}")
        raise DataError(f"{p}: line {n}: empty {required[c]}")
    return table, line_no
