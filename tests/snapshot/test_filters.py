"""List filters in containerd's syntax, through the real gRPC API."""

from __future__ import annotations

import grpc
import pytest
from conftest import Served
from snap_helpers import commit_l, expect_code, list_names, prepare, prepare_l, view

from nydus_core.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb

REF = "containerd.io/snapshot.ref"


@pytest.fixture
def populated(served: Served) -> Served:
    """base (committed) <- sha256:aa (committed, remote-like) <- ctr (active); view vw on base."""
    stub = served.stub
    prepare_l(stub, "k8s.io/1/extract-1 sha256:base", "", {REF: "sha256:base", "team": "a"})
    commit_l(stub, "base", "k8s.io/1/extract-1 sha256:base", {REF: "sha256:base", "team": "a"})
    prepare(stub, "k8s.io/2/extract-2 sha256:aa", "base")
    commit_l(stub, "sha256:aa", "k8s.io/2/extract-2 sha256:aa",
             {REF: "sha256:aa", "team": "b", "with space": "v, w", "empty": ""})
    prepare(stub, "ctr", "sha256:aa", team="a")
    view(stub, "vw", "base")
    return served


def test_no_filter_lists_everything(populated: Served) -> None:
    assert list_names(populated.stub) == ["base", "ctr", "sha256:aa", "vw"]
    assert list_names(populated.stub, "") == ["base", "ctr", "sha256:aa", "vw"]


def test_containerd_remote_snapshot_filter(populated: Served) -> None:
    f = f'labels."{REF}"==sha256:aa,parent==base'
    assert list_names(populated.stub, f) == ["sha256:aa"]
    assert list_names(populated.stub, f'labels."{REF}"==sha256:aa,parent=="base"') == ["sha256:aa"]
    assert list_names(populated.stub, f'labels."{REF}"==sha256:aa,parent==other') == []


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        ("kind==committed", ["base", "sha256:aa"]),
        ("kind==active", ["ctr"]),
        ("kind==view", ["vw"]),
        ("kind!=committed", ["ctr", "vw"]),
        ("name==ctr", ["ctr"]),
        ('name=="sha256:aa"', ["sha256:aa"]),
        ("name!=ctr", ["base", "sha256:aa", "vw"]),
        ("name~=^sha256:", ["sha256:aa"]),
        ("name~=/a+$/", ["sha256:aa"]),  # /.../ quoting reads as a regexp delimiter
        ("name~=/s.*a/", ["sha256:aa"]),
        ("name~=|^b|", ["base"]),
        ("parent==base", ["sha256:aa", "vw"]),
        ('parent==""', ["base"]),
        ("labels.team==a", ["base", "ctr"]),
        ("labels.team!=a", ["sha256:aa", "vw"]),  # absent counts as "" for !=
        ("labels.team", ["base", "ctr", "sha256:aa"]),  # presence
        ("labels.empty", ["sha256:aa"]),  # present with an empty value
        ('labels."with space"=="v, w"', ["sha256:aa"]),
        (f'labels."{REF}"', ["base", "sha256:aa"]),
        ('labels."containerd.io/snapshot.ref"~=base$', ["base"]),
        ("labels.containerd.io/snapshot.ref", []),  # '/' starts a quoted token: not a field path
        ("kind==committed,labels.team==b", ["sha256:aa"]),  # AND
        ("  kind == committed , labels.team == a ", ["base"]),  # spaces around tokens
        ('name=="sha\\u0032\\x35\\066:aa"', ["sha256:aa"]),  # Go escapes in "..." strings
        ("nosuchfield", []),
        ("nosuchfield!=x", ["base", "ctr", "sha256:aa", "vw"]),
    ],
)
def test_single_filters(populated: Served, flt: str, expected: list[str]) -> None:
    if flt == "labels.containerd.io/snapshot.ref":
        expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: list_names(populated.stub, flt))
        return
    assert list_names(populated.stub, flt) == expected


def test_several_strings_are_or(populated: Served) -> None:
    assert list_names(populated.stub, "name==ctr", "kind==view") == ["ctr", "vw"]
    assert list_names(populated.stub, "name==ctr", "name==ctr,kind==view") == ["ctr"]


@pytest.mark.parametrize(
    "bad",
    ["name=", "name===x", "name==", ",", "name==a,", "labels.", 'name=="unterminated', "name~=(", "a b",
     "name=~x", 'name=="\\q"'],
)
def test_syntax_errors_are_invalid_argument(populated: Served, bad: str) -> None:
    msg = expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: list_names(populated.stub, bad))
    assert repr(bad) in msg  # names the filter


def test_list_reports_committed_info(populated: Served) -> None:
    [resp] = list(populated.stub.List(pb.ListSnapshotsRequest(filters=['name=="sha256:aa"'])))
    [info] = resp.info
    assert info.kind == pb.COMMITTED and info.parent == "base"
    assert dict(info.labels)[REF] == "sha256:aa"
    assert info.created_at.seconds > 0
