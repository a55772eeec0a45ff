"""Fuzzing the eStargz parsers with hypothesis: hostile footers, TOC members and TOC JSON.

Whatever the input, the parsers and the TOC-to-bootstrap conversion either succeed or raise
`TocError` (the plugin's own error type, which the format turns into InvalidArgument); nothing
else may escape. ``NYDUS_FUZZ_EXAMPLES`` scales the runs (CI: 10k TOC cases; a long run: 100k+).
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import hashlib
import io
import json
import os
import tarfile
import threading
from typing import Any
from unittest import mock

import nydus_stargz.toc as toc_mod
import pytest
from estargz_writer import Item, footer, write_estargz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nydus_stargz import bootstrap
from nydus_stargz.bootstrap import build_layer
from nydus_stargz.gcpause import paused
from nydus_stargz.toc import TocError, TocFile, parse_footer, parse_toc, read_toc_member

EXAMPLES = int(os.environ.get("NYDUS_FUZZ_EXAMPLES", "10000"))
FAST = settings(
    max_examples=max(100, EXAMPLES // 5), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
FULL = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYS = [
    "name",
    "type",
    "size",
    "modtime",
    "linkName",
    "mode",
    "uid",
    "gid",
    "devMajor",
    "devMinor",
    "xattrs",
    "digest",
    "offset",
    "innerOffset",
    "chunkOffset",
    "chunkSize",
    "chunkDigest",
]
# Values drawn for any key: right and wrong types, edge numbers, hostile names and digests. One
# pool keeps drawing cheap (hypothesis spends its time generating, not in our parser).
POOL = st.sampled_from(
    [
        None,
        True,
        False,
        0.5,
        float("nan"),
        "",
        "x",
        [],
        [1],
        {},
        {"a": 1},
        {"user.a": "dg=="},
        {"k": "!!"},
        -1,
        0,
        1,
        7,
        511,
        512,
        4096,
        4 << 20,
        (4 << 20) + 1,
        1 << 32,
        1 << 63,
        -(1 << 63),
        "dir",
        "reg",
        "symlink",
        "hardlink",
        "char",
        "block",
        "fifo",
        "chunk",
        "sock",
        "a",
        "a/b",
        "./a/c",
        "/abs",
        "../up",
        "a/../../x",
        "d/",
        "a/b/c/d",
        ".wh.a",
        "d/.wh..wh..opq",
        "x\x00y",
        "\ud800",
        "a/\udcff",
        1 << 20,
        ".prefetch.landmark",
        "a" * 300,
        "é/ü",
        "stargz.index.json",
        "sha256:" + "ab" * 32,
        "sha256:" + "00" * 32,
        "sha256:xyz",
        "md5:00",
        "2019-06-12T17:52:45Z",
        "1969-01-01T00:00:00Z",
        "2020-13-40T99:99:99Z",
        "2021-01-01T00:00:00.123456789+05:30",
    ]
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=12,
)
ENTRY = st.lists(st.tuples(st.sampled_from(KEYS), POOL), max_size=7).map(dict)
VALID_BLOB, VALID_TOC = write_estargz(
    [
        Item("d/", "dir"),
        Item("d/f", data=b"payload" * 40),
        Item("d/big", data=bytes(range(256)) * 40000),
        Item("h", "hardlink", link="d/f"),
        Item("l", "symlink", link="d/f"),
        Item(".wh.x", data=b""),
        Item("c", "char", dev=(5, 1)),
        Item("e/", "dir", xattrs={"user.a": b"1"}),
    ]
)
VALID_ENTRIES = json.loads(VALID_TOC)["entries"]
# A valid TOC with a few entries rewritten: reaches the conversion's deeper checks.
MUTATION = st.tuples(st.integers(0, len(VALID_ENTRIES) - 1), st.sampled_from(KEYS), POOL | st.just(KeyError))


def _mutated(mutations: list[tuple[int, str, Any]]) -> dict[str, Any]:
    entries = [dict(e) for e in VALID_ENTRIES]
    for i, key, value in mutations:
        if value is KeyError:
            entries[i].pop(key, None)
        else:
            entries[i][key] = value
    return {"version": 1, "entries": entries}


TOCS = st.one_of(
    st.fixed_dictionaries(
        {"version": st.sampled_from([1, 1, 1, 2, "1", None, True]), "entries": st.lists(ENTRY, max_size=5)}
    ),
    st.lists(MUTATION, min_size=1, max_size=4).map(_mutated),
)


def _toc_file(doc: bytes) -> TocFile:
    return TocFile(doc, 512, 0o644, 0, 0, 0)


@FULL
@given(TOCS)
def test_fuzz_toc_json_and_conversion(doc: dict[str, Any]) -> None:
    raw = json.dumps(doc).encode()
    with contextlib.suppress(TocError):
        toc = parse_toc(raw)
        build_layer(toc, _toc_file(raw), blob_id="cd" * 32, blob_size=1 << 30, toc_offset=(1 << 30) - 4096)


@FAST
@given(st.binary(max_size=512) | JSON.map(lambda v: json.dumps(v).encode()))
def test_fuzz_toc_bytes(raw: bytes) -> None:
    with contextlib.suppress(TocError):
        parse_toc(raw)


@FAST
@given(st.integers(0, len(VALID_BLOB) - 1), st.integers(1, 255), st.integers(0, 60))
def test_fuzz_footer_and_member_mutations(at: int, xor: int, cut: int) -> None:
    """One byte of a valid blob changed and its tail cut: the footer and TOC member parsers
    answer a `Footer`/`TocFile` or `TocError`, never anything else."""
    bad = bytearray(VALID_BLOB)
    bad[at] ^= xor
    blob = bytes(bad[: len(bad) - cut])
    with contextlib.suppress(TocError):
        f = parse_footer(blob[-64:], len(blob))
        toc_file = read_toc_member(blob[f.toc_offset : len(blob) - f.size])
        toc = parse_toc(toc_file.json_bytes)
        build_layer(toc, toc_file, blob_id="ef" * 32, blob_size=len(blob), toc_offset=f.toc_offset)


@FAST
@given(st.binary(max_size=200), st.integers(0, 1 << 40))
def test_fuzz_footer_bytes(junk: bytes, offset: int) -> None:
    for tail in (junk, junk + footer(offset), footer(offset)[: len(junk) % 51]):
        with contextlib.suppress(TocError):
            parse_footer(tail, 1 << 20)


@FAST
@given(st.binary(max_size=2048))
def test_fuzz_toc_member_gzip_of_junk(payload: bytes) -> None:
    """A TOC member that is valid gzip around junk, or around a tar without the TOC entry."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("not-the-toc")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    for member in (gzip.compress(payload), gzip.compress(buf.getvalue()), payload):
        with contextlib.suppress(TocError):
            read_toc_member(member)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "\ud800", "type": "dir"}, "name '\\\\ud800' is not text"),
        ({"name": "l", "type": "symlink", "linkName": "x\udfff"}, "linkName 'x\\\\udfff' is not text"),
        ({"name": "d", "type": "dir", "xattrs": {"user.\ud800": "AA=="}}, "xattr name 'user.\\\\ud800'"),
        ({"name": "c", "type": "char", "devMajor": 4096}, "device 4096:0 does not fit a Linux dev_t"),
        ({"name": "b", "type": "block", "devMinor": 1 << 20}, "device 0:1048576 does not fit"),
    ],
    ids=["name-surrogate", "link-surrogate", "xattr-surrogate", "major", "minor"],
)
def test_values_no_layer_can_hold_are_toc_errors(entry: dict[str, Any], message: str) -> None:
    """Found by a seeded corpus: a lone surrogate escape (Go never writes one) failed to encode
    and a device number past the kernel's 12/20-bit dev_t was encoded wrong or failed to pack."""
    raw = json.dumps({"version": 1, "entries": [entry]}).encode()
    with pytest.raises(TocError, match=message):
        build_layer(parse_toc(raw), _toc_file(raw), blob_id="cd" * 32, blob_size=1 << 20, toc_offset=4096)


def test_surrogate_escapes_of_bytes_still_name_files() -> None:
    """``\\udc80``-``\\udcff`` stand for bytes that are not UTF-8 (surrogateescape): such names stay
    usable, and stay out of the prefetch table (whose paths are text)."""
    entries = [
        {"name": "f\udcff", "type": "reg", "size": 0},
        {"name": "g", "type": "reg", "size": 0},
        {"name": ".prefetch.landmark", "type": "reg", "size": 0},
    ]
    raw = json.dumps({"version": 1, "entries": entries}).encode()
    built = build_layer(parse_toc(raw), _toc_file(raw), blob_id="cd" * 32, blob_size=1 << 20, toc_offset=4096)
    assert built.prefetch == ("/g",)


# -- the fast paths: the same entries and bootstraps as the careful ones ------------------------------
# Mostly names a layer has, now and then one that only `add_tar_member` may answer.
PARTS = st.sampled_from(
    ["a"] * 20 + ["b"] * 15 + ["c"] * 10 + ["", ".", "..", ".wh.a", ".wh..wh..opq", "x" * 256, "é", "f\udcff"]
)
NAMES = st.tuples(
    st.sampled_from([""] * 12 + ["./", "./", "/", ".//"]),
    st.lists(PARTS, min_size=1, max_size=4).map("/".join),
    st.sampled_from([""] * 4 + ["/"] * 3 + ["//"]),
).map("".join)
PLAIN = st.fixed_dictionaries(
    {
        "name": NAMES,
        "type": st.sampled_from(["dir", "dir", "reg", "reg", "symlink", "hardlink", "char", "fifo"]),
    },
    optional={
        "linkName": st.sampled_from(["a", "a/b", "b/c"] * 4 + ["", "x" * 4096]) | NAMES,
        "mode": st.sampled_from([0o755, 0o40755, 0o100644, 0o7777]),
        "uid": st.integers(0, 3),
        "modtime": st.sampled_from(["2019-06-12T17:52:45Z", "2021-01-01T00:00:00.5+01:00"]),
        "xattrs": st.sampled_from([{"user.a": "MQ=="}, {}]),
    },
)


def _outcome(raw: bytes) -> str:
    try:
        built = build_layer(
            parse_toc(raw), _toc_file(raw), blob_id="cd" * 32, blob_size=1 << 20, toc_offset=4096
        )
    except TocError as e:
        return f"TocError: {e}"
    return hashlib.sha256(built.bootstrap).hexdigest() + repr((built.prefetch, built.markers))


@FAST
@given(st.lists(PLAIN, max_size=12))
def test_fast_placement_makes_the_tree_add_tar_member_makes(entries: list[dict[str, Any]]) -> None:
    """Plain entries placed by `_Placer` itself give the bootstrap (or the refusal) that placing
    every entry with `add_tar_member` gives."""
    raw = json.dumps({"version": 1, "entries": entries}).encode()
    fast = _outcome(raw)
    with mock.patch.object(bootstrap._Placer, "_plain", lambda self, e: None):
        assert _outcome(raw) == fast


@FAST
@given(
    st.lists(ENTRY, max_size=3)
    | st.lists(MUTATION, min_size=1, max_size=4).map(lambda m: _mutated(m)["entries"])
)
def test_fast_entry_parser_agrees(entries: list[dict[str, Any]]) -> None:
    """`_entry_fast` makes what `_entry` makes, or leaves the entry to it."""
    for i, doc in enumerate(entries):
        fast = toc_mod._entry_fast(doc, {"": (0, 0)})
        if fast is not None:
            assert fast == toc_mod._entry(doc, i)


def test_gc_pause_nests_across_threads_and_restores() -> None:
    assert gc.isenabled()
    inside = threading.Event()
    leave = threading.Event()

    def other() -> None:
        with paused():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    with paused():
        assert not gc.isenabled()
        t.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other thread's conversion still runs
    leave.set()
    t.join(10)
    assert gc.isenabled()
    with contextlib.suppress(TocError), paused():
        parse_toc(b"{")
    assert gc.isenabled()
    gc.disable()
    try:
        with paused():
            pass
        assert not gc.isenabled()  # off before, off after
    finally:
        gc.enable()
