"""One request cannot freeze the gRPC surface or poison the store (issue 15's filter and label part).

* ``~=`` has containerd's semantics (RE2, as Go's ``regexp``) in linear time: a pattern that made
  Python's backtracking engine run for seconds -- holding the GIL against every other call --
  is answered at once, and what RE2 refuses (backreferences, lookarounds) is InvalidArgument;
* labels are bounded as containerd's metadata store bounds them (4 KiB for key and value), and an
  empty key is refused;
* ``List`` answers in messages bounded in bytes, so large labels never hit the 16 MiB limit;
* a request grpc cannot decode is answered and logged in one line, without a traceback.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
import pytest
from conftest import Served
from google.protobuf import field_mask_pb2
from snap_helpers import commit_l, expect_code, list_names, prepare, prepare_l

from nydus_core.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from nydus_core.control.snapshot import filters
from nydus_core.control.snapshot.model import Info, Kind
from nydus_core.control.snapshot.service import LIST_BATCH_BYTES, list_batches
from nydus_core.errors import InvalidArgument
from nydus_core.labels import MAX_LABEL_BYTES

C = grpc.StatusCode
EVIL = "(a+)+$"  # exponential for a backtracking engine on "aaa...ab"


def test_catastrophic_pattern_is_linear_and_blocks_nobody(served: Served) -> None:
    value = "a" * 4000 + "b"  # the largest value a label can have; 27 a's took 10.8 s before
    prepare_l(served.stub, "k1", "", {"a": value})
    answer: list[object] = []
    t0 = time.monotonic()
    worker = threading.Thread(target=lambda: answer.append(list_names(served.stub, f'labels.a~="{EVIL}"')))
    worker.start()
    stat = served.stub.Stat(pb.StatSnapshotRequest(key="k1"))  # an unrelated call beside it
    worker.join(30)
    took = time.monotonic() - t0
    assert not worker.is_alive(), "List with a catastrophic pattern did not return"
    assert answer == [[]] and stat.info.name == "k1"
    print(
        f"\n[filters] {EVIL!r} over a 4001-character label: List and a Stat beside it in {took * 1000:.1f} ms"
    )
    assert list_names(served.stub, 'labels.a~="a+b$"') == ["k1"]  # and it still matches what matches


@pytest.mark.parametrize("pattern", [r"(a)\1", "(?=a)", "(?!a)b", "(?<=a)b", "a++", "x{1001}"])
def test_what_re2_refuses_is_invalid_argument(served: Served, pattern: str) -> None:
    msg = expect_code(C.INVALID_ARGUMENT, lambda: list_names(served.stub, f"labels.a~=|{pattern}|"))
    assert "RE2 syntax" in msg


def test_re2_syntax_that_go_accepts_works() -> None:
    info = Info(name="n", kind=Kind.ACTIVE, labels={"a": "Hello World 42"})
    for pattern in ("(?i)hello", r"\d+$", "[[:alpha:]]+ [[:alpha:]]+", "(?P<w>World)", "^H.*2$"):
        assert filters.parse([f"labels.a~=|{pattern}|"])(info), pattern


def test_filters_are_bounded() -> None:
    with pytest.raises(InvalidArgument, match="at most 4096 are accepted"):
        filters.parse(["name==" + "x" * filters.MAX_FILTER_CHARS])
    with pytest.raises(InvalidArgument, match="at most 64 are accepted"):
        filters.parse(["name==x"] * (filters.MAX_FILTERS + 1))


def test_labels_bounded_as_containerd_bounds_them(served: Served) -> None:
    stub = served.stub
    ok_value = "v" * (MAX_LABEL_BYTES - len("k"))
    prepare_l(stub, "fits", "", {"k": ok_value})  # exactly 4096 bytes: accepted
    msg = expect_code(C.INVALID_ARGUMENT, lambda: prepare_l(stub, "big", "", {"k": ok_value + "v"}))
    assert "label key and value length (4097 bytes) greater than maximum size (4096 bytes), key: k" in msg
    expect_code(C.NOT_FOUND, lambda: stub.Stat(pb.StatSnapshotRequest(key="big")))  # nothing half-made
    assert "must not be empty" in expect_code(C.INVALID_ARGUMENT, lambda: prepare_l(stub, "e", "", {"": "v"}))
    huge = "é" * (MAX_LABEL_BYTES // 2 + 1)  # bytes, not characters, count
    expect_code(C.INVALID_ARGUMENT, lambda: commit_l(stub, "c", "fits", {"k": huge}))
    info = pb.Info(name="fits", labels={"x" * 5000: "1"})
    mask = field_mask_pb2.FieldMask(paths=["labels"])
    expect_code(
        C.INVALID_ARGUMENT, lambda: stub.Update(pb.UpdateSnapshotRequest(info=info, update_mask=mask))
    )
    assert served.stub.Stat(pb.StatSnapshotRequest(key="fits")).info.labels["k"] == ok_value


def test_list_batches_are_bounded_in_bytes(served: Served) -> None:
    """40 snapshots with 100 labels of 4 KiB each (16 MB in all, more than containerd's 16 MiB
    message limit and four times the Python client's 4 MiB): List answers every one of them."""
    labels = {f"label-{i:03d}": "x" * (MAX_LABEL_BYTES - 9) for i in range(100)}
    for i in range(40):
        prepare(served.stub, f"big-{i:02d}")
        commit_l(served.stub, f"c-{i:02d}", f"big-{i:02d}", labels)
    names = [info.name for msg in served.stub.List(pb.ListSnapshotsRequest()) for info in msg.info]
    assert len(names) == 40
    infos = [Info(name=f"n{i}", kind=Kind.COMMITTED, labels=labels) for i in range(40)]
    sizes = [msg.ByteSize() for msg in list_batches(infos)]
    assert len(sizes) > 10 and max(sizes) <= LIST_BATCH_BYTES + 420_000  # one entry may overshoot
    small = [Info(name=f"s{i}", kind=Kind.ACTIVE) for i in range(250)]
    assert [len(msg.info) for msg in list_batches(small)] == [100, 100, 50]  # containerd's 100 per batch


def test_undecodable_request_is_one_log_line(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    with grpc.insecure_channel(f"unix://{served.socket}") as channel:
        raw = channel.unary_unary(
            "/containerd.services.snapshots.v1.Snapshots/Prepare",
            request_serializer=lambda x: x,
            response_deserializer=lambda x: x,
        )
        with caplog.at_level(logging.DEBUG):
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as exc:
                    raw(b"\xff\xff\xff\x01garbage")
                assert exc.value.code() == C.INTERNAL
    lines = [r for r in caplog.records if "deserializing" in r.getMessage()]
    assert len(lines) == 3 and not any(r.exc_info for r in lines)
    assert "DecodeError" in lines[0].getMessage()
    assert prepare(served.stub, "still-serving")  # and the server goes on
