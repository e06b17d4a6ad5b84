"""Text files as other tools write them (issue 7, part 1): every harmless variant of a
.inter / .json / YAML file loads to exactly the clean file's arrays; every broken one
fails with one line naming the file, the line and the real problem."""
from __future__ import annotations

import codecs
import json

import numpy as np
import pytest

from mmssl.config import Config, read_yaml_mapping
from mmssl.errors import ConfigError, DataError
from tests.test_data import SPLITS, quiet_load, write_mmrec, write_mmssl

HEADER = "itemID\tx_label\ttimestamp\tuserID"


def _rows():
    rows = []
    for code, s in enumerate(("train", "val", "test")):
        for u, items in SPLITS[s].items():
            rows += [[str(i), str(code), "12345", str(u)] for i in items]
    return rows


def _clean_text() -> str:
    return "\n".join([HEADER] + ["\t".join(r) for r in _rows()]) + "\n"


def _arrays(ds):
    return ((ds.n_users, ds.n_items), {s: getattr(ds, s).toarray() for s in ("train", "val", "test")},
            {k: v.copy() for k, v in ds.features.items()})


def _same(a, b):
    assert a[0] == b[0]
    for s in a[1]:
        np.testing.assert_array_equal(a[1][s], b[1][s])
    assert a[2].keys() == b[2].keys()
    for k in a[2]:
        np.testing.assert_array_equal(a[2][k], b[2][k])


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return _arrays(quiet_load(write_mmrec(tmp_path_factory.mktemp("clean") / "d")))


def _lines_with(sep_line=lambda r: "\t".join(r)):
    return [sep_line(r) for r in _rows()]


INTER_VARIANTS = {
    "utf8_bom": lambda: codecs.BOM_UTF8 + _clean_text().encode(),
    "utf16_le_bom": lambda: _clean_text().encode("utf-16"),  # Excel "Unicode text"
    "utf16_be_bom": lambda: codecs.BOM_UTF16_BE + _clean_text().encode("utf-16-be"),
    "utf32_bom": lambda: _clean_text().encode("utf-32"),
    "crlf": lambda: _clean_text().replace("\n", "\r\n").encode(),
    "cr_only": lambda: _clean_text().replace("\n", "\r").encode(),
    "bom_and_crlf": lambda: codecs.BOM_UTF8 + _clean_text().replace("\n", "\r\n").encode(),
    "quoted_fields": lambda: ("\n".join(['"itemID"\t"x_label"\t"timestamp"\t"userID"'] +
                                        _lines_with(lambda r: "\t".join(f'"{v}"' for v in r))) + "\n").encode(),
    "blank_and_space_lines": lambda: ("\n".join([HEADER, ""] + _lines_with()[:3] + ["   ", "\t\t\t"] +
                                                _lines_with()[3:]) + "\n\n\n").encode(),
    "no_final_newline": lambda: _clean_text().rstrip("\n").encode(),
    "trailing_tab_everywhere": lambda: ("\n".join([HEADER + "\t"] + [ln + "\t" for ln in _lines_with()]) + "\n").encode(),
    "trailing_tab_in_header_only": lambda: ("\n".join([HEADER + "\t"] + _lines_with()) + "\n").encode(),
    "spaces_around_fields": lambda: ("\n".join([" itemID \t x_label\ttimestamp\tuserID "] +
                                               _lines_with(lambda r: "\t".join(f" {v} " for v in r))) + "\n").encode(),
    "extra_text_column_non_ascii": lambda: ("\n".join([HEADER + "\ttitle"] +
                                                      [ln + "\tcafé ☕" for ln in _lines_with()]) + "\n").encode(),
}


@pytest.mark.parametrize("variant", sorted(INTER_VARIANTS))
def test_inter_layout_variants_load_like_the_clean_file(tmp_path, clean, variant):
    root = write_mmrec(tmp_path / "d")
    (root / "tiny.inter").write_bytes(INTER_VARIANTS[variant]())
    _same(_arrays(quiet_load(root)), clean)


def test_inter_bom_header_names_no_invisible_character(tmp_path):
    """The reported case: a BOM before a header lacking a column names the real column."""
    root = write_mmrec(tmp_path / "d")
    (root / "tiny.inter").write_bytes(codecs.BOM_UTF8 + b"userID\titemID\n0\t1\n")
    with pytest.raises(DataError) as ei:
        quiet_load(root)
    assert str(ei.value) == f"{root / 'tiny.inter'}: missing column(s) x_label in header (found: userID, itemID)"


@pytest.mark.parametrize("data, expected", [
    (b"userID\titemID\tx_label\n0\t1\t0\n0\t2\xe9\t0\n", "line 3: not valid UTF-8 text (byte 0xe9); save the file as UTF-8"),
    ("userID\titemID\tx_label\n0\t1\t0\n".encode("utf-16-le"),
     "contains NUL bytes (UTF-16/UTF-32 text without a byte-order mark?); save it as UTF-8"),
    (b"userID,itemID,x_label\n0,1,0\n",
     "missing column(s) userID, itemID, x_label in header (found: userID,itemID,x_label); "
     "the header has no tab: the file must be tab-separated"),
    (b"userID\titemID\tx_label\n0\t1\t0\n0\t2\t0\t9\n", "line 3: expected 3 tab-separated fields, found 4"),
    (b"userID\titemID\tx_label\n0\t1\t0\n\n0\t2\n", "line 4: expected 3 tab-separated fields, found 2"),
    (b"userID\titemID\tx_label\n0\t\t0\n", "line 2: empty itemID"),
    (b"userID\titemID\tx_label\n0\t1\t0\n0\t3.0\t0\n", "line 3: non-integer itemID '3.0'"),
    (b"userID\titemID\tx_label\n0\t1\t0\n0\t99999999999\t0\n", "line 3: too large (max 2147483646) itemID '99999999999'"),
    (b"\nuserID\titemID\tx_label\n0\t1\t0\n", "line 1: empty header line (expected userID, itemID, x_label)"),
    (codecs.BOM_UTF8, "empty file (expected a header with userID, itemID, x_label)"),
])
def test_inter_broken_variants_name_file_line_and_problem(tmp_path, data, expected):
    root = write_mmrec(tmp_path / "d")
    (root / "tiny.inter").write_bytes(data)
    with pytest.raises(DataError) as ei:
        quiet_load(root)
    assert str(ei.value) == f"{root / 'tiny.inter'}: {expected}"


JSON_VARIANTS = {
    "utf8_bom": lambda t: codecs.BOM_UTF8 + t.encode(),
    "utf16_bom": lambda t: t.encode("utf-16"),
    "utf32_bom": lambda t: t.encode("utf-32"),
    "crlf_pretty": lambda t: json.dumps(json.loads(t), indent=2).replace("\n", "\r\n").encode(),
}


@pytest.mark.parametrize("variant", sorted(JSON_VARIANTS))
def test_json_layout_variants_load_like_the_clean_file(tmp_path, clean, variant):
    root = write_mmssl(tmp_path / "d")
    for s in ("train", "val", "test"):
        p = root / f"{s}.json"
        p.write_bytes(JSON_VARIANTS[variant](p.read_text()))
    _same(_arrays(quiet_load(root)), clean)


def test_json_invalid_utf8_names_the_line(tmp_path):
    root = write_mmssl(tmp_path / "d")
    (root / "val.json").write_bytes(b'{"0": [2],\n"1": [4], "\xff": []}')
    with pytest.raises(DataError) as ei:
        quiet_load(root)
    assert str(ei.value) == f"{root / 'val.json'}: line 2: not valid UTF-8 text (byte 0xff); save the file as UTF-8"


@pytest.mark.parametrize("encode", [lambda t: codecs.BOM_UTF8 + t.encode(), lambda t: t.encode("utf-16"),
                                    lambda t: t.replace("\n", "\r\n").encode()])
def test_yaml_files_with_bom_or_utf16_read_like_the_clean_file(tmp_path, encode):
    text = "epochs: 7\nlambda2: 0.1\nmodalities: [image]\n"
    p = tmp_path / "c.yaml"
    p.write_bytes(encode(text))
    assert read_yaml_mapping(p) == {"epochs": 7, "lambda2": 0.1, "modalities": ["image"]}
    assert Config.from_yaml(p).cl_weight == 0.1


def test_yaml_space_file_with_bom_loads(tmp_path):
    from tune.space import load_space
    p = tmp_path / "s.yaml"
    p.write_bytes(codecs.BOM_UTF8 + b"search:\n  dropout: {dist: uniform, low: 0.0, high: 0.4, step: 0.1}\n")
    assert load_space(str(p)).params["dropout"].high == 0.4


def test_yaml_invalid_utf8_is_a_config_error_naming_the_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"epochs: 3\n# caf\xe9\n")
    with pytest.raises(ConfigError) as ei:
        read_yaml_mapping(p)
    assert str(ei.value) == f"{p}: line 2: not valid UTF-8 text (byte 0xe9); save the file as UTF-8"


def test_inter_header_case_mismatch_is_named(tmp_path):
    root = write_mmrec(tmp_path / "d")
    (root / "tiny.inter").write_bytes(b"UserID\titemid\tx_label\n0\t1\t0\n")
    with pytest.raises(DataError) as ei:
        quiet_load(root)
    assert str(ei.value) == (f"{root / 'tiny.inter'}: missing column(s) userID, itemID in header "
                             "(found: UserID, itemid, x_label); column names are case-sensitive (UserID, itemid found)")
