"""The Snapshotter: containerd's overlayfs snapshotter semantics plus nydus' remote-snapshot hooks.

Directory life cycle (what makes a kill -9 harmless):

* Prepare/View build ``snapshots/new-XXXX/{fs,work}`` first, insert the record inside an open
  transaction, rename the directory to ``snapshots/<id>`` and only then commit. A crash before the
  commit leaves a directory without a record, which `cleanup` deletes; it never leaves a record
  without its directory.
* Remove deletes the record and renames ``snapshots/<id>`` to ``snapshots/rm-<id>`` inside the
  transaction. If the process dies between that rename and the commit, the record survived; the
  constructor moves such ``rm-<id>`` directories back (`_recover_removals`).
* `cleanup` deletes every directory under ``snapshots/`` that no record names (``new-*``,
  ``rm-*`` and stray ids), after letting the image service drop what no live snapshot uses.

Remote snapshots (upstream's "already exists" protocol, reference §1.4): a Prepare carrying
``containerd.io/snapshot.ref`` asks the image formats (`nydus_core.records.FormatRecord`, in
priority order) whether they serve the layer lazily; if one does, the active snapshot is
committed under the target name at once and containerd is told ``AlreadyExists`` so it skips the download.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from nydus_core import labels as L
from nydus_core.config import SnapshotterConfig
from nydus_core.control.daemons.model import Instance
from nydus_core.control.snapshot import filters
from nydus_core.control.snapshot.metastore import ChainLink, MetaStore, Record
from nydus_core.control.snapshot.model import (
    ChainEntry,
    ImageSource,
    Info,
    Kind,
    Layer,
    LayerClaim,
    Mount,
    MountRequest,
    Snapshot,
    SnapshotPaths,
    Usage,
)
from nydus_core.errors import AlreadyExists, FailedPrecondition, SnapshotterError
from nydus_core.plugins import NydusPluginManager
from nydus_core.records import FormatContext

log = logging.getLogger(__name__)

_MNT_DETACH = 2


class ImageService(Protocol):
    """What the snapshotter needs from the daemon manager (`nydus_core.control.daemons.manager`)."""

    def ensure_instance(self, image: ImageSource, labels: dict[str, str]) -> Instance:
        """Serve `image` (start or reuse a daemon, attach, wait until ready) and return it."""
        ...

    def get_instance(self, meta_id: str) -> Instance | None:
        """The live instance of a meta snapshot, or ``None`` when none is registered."""
        ...

    def release_unused(self, live_snapshot_ids: set[str]) -> None:
        """Detach/stop whatever serves meta snapshots no longer in `live_snapshot_ids`."""
        ...


class NoImageService(SnapshotterError):
    """A plugin found a lazily served image but the snapshotter runs without a daemon manager."""

    grpc_status = FailedPrecondition.grpc_status


def disk_usage(root: Path) -> Usage:
    """Bytes of allocated blocks and number of inodes under `root` (containerd ``fs.DiskUsage``).

    Hard links are counted once; the root itself counts. Missing files (raced away) are skipped.
    """
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [str(root)]
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return Usage()
    seen.add((st.st_dev, st.st_ino))
    size += st.st_blocks * 512
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                ident = (st.st_dev, st.st_ino)
                if ident not in seen:
                    seen.add(ident)
                    size += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return Usage(size=size, inodes=len(seen))


def mount_points() -> list[str]:
    """Every mount point of this mount namespace (from /proc/self/mountinfo, unescaped)."""
    points = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                mp = line.split(" ", 5)[4]
                points.append(mp.encode().decode("unicode_escape") if "\\" in mp else mp)
    except OSError:
        return []
    return points


def _mounts_under(path: Path, points: list[str] | None = None) -> list[str]:
    """Mount points at or below `path`, deepest first (from `points` or /proc/self/mountinfo)."""
    prefix = str(path).rstrip("/")
    found = [mp for mp in (mount_points() if points is None else points)
             if mp == prefix or mp.startswith(prefix + "/")]
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path, points: list[str] | None = None) -> None:
    """Delete a snapshot directory, lazily unmounting anything still mounted inside it first.

    rmtree would otherwise walk into a live mount (an image mountpoint) and delete its content.
    `points` (from `mount_points`) spares re-reading the mount table when deleting many.
    """
    mounts = _mounts_under(path, points)
    if mounts:
        libc = ctypes.CDLL(None, use_errno=True)
        for mp in mounts:
            if libc.umount2(mp.encode(), _MNT_DETACH) != 0:
                err = ctypes.get_errno()
                log.warning("cannot unmount %s: %s; not deleting %s", mp, os.strerror(err), path)
                return
    shutil.rmtree(path, ignore_errors=True)


class Snapshotter:
    """containerd's snapshotter operations over a root directory, a metastore and the plugins."""

    def __init__(
        self,
        root: Path,
        config: SnapshotterConfig,
        pm: NydusPluginManager,
        images: ImageService | None = None,
    ) -> None:
        self.root = Path(root)
        self.config = config
        self.pm = pm
        self.hooks = pm.typed
        # Enabled formats, highest priority first: fixed for the life of the process.
        self.formats = pm.registry.ordered_formats(config)
        for fmt in self.formats:
            fmt.format.open(FormatContext(root=Path(root), config=config, hooks=pm.typed))
        self.images = images
        self.paths = SnapshotPaths(self.root)
        self.snapshots_dir = self.root / "snapshots"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.snapshots_dir.mkdir(mode=0o700, exist_ok=True)
        self.ms = MetaStore(self.root / "metadata.db")
        # Temp directories of Prepares in flight: cleanup must not delete them.
        self._inflight: set[str] = set()
        self._inflight_lock = threading.Lock()
        self._uppers: dict[str, Path] = {}
        # Mounts of Active/View snapshots not served by an image, per key (see `_cache_mounts`).
        self._mount_cache: dict[str, tuple[Mount, ...]] = {}
        self._mount_gen = 0
        self._mount_lock = threading.Lock()
        self._recover_removals()

    # ------------------------------------------------------------------ helpers

    def _recover_removals(self) -> None:
        """Undo a Remove that was interrupted between its directory rename and its commit."""
        for entry in os.scandir(self.snapshots_dir):
            if entry.name.startswith("rm-"):
                sid = entry.name[3:]
                if sid.isdigit() and self.ms.exists_id(sid) and not (self.snapshots_dir / sid).exists():
                    os.rename(entry.path, self.snapshots_dir / sid)
                    log.warning("restored snapshots/%s: its removal never committed", sid)

    def _upper(self, sid: str) -> Path:
        """``snapshots/<id>/fs``, memoised: building Paths part by part is a visible cost on the
        Mounts hot path, and ids are never reused for another directory."""
        path = self._uppers.get(sid)
        if path is None:
            if len(self._uppers) > 65536:
                self._uppers.clear()
            path = self._uppers[sid] = Path(f"{self.snapshots_dir}/{sid}/fs")
        return path

    def _request(self, key: str, snap: Snapshot, labels: dict[str, str]) -> MountRequest:
        upper = self._upper(snap.id)
        return MountRequest(
            id=snap.id,
            key=key,
            kind=snap.kind,
            upper=upper,
            work=upper.with_name("work"),
            lowers=tuple(self._upper(p) for p in snap.parent_ids),
            labels=labels,
        )

    def _cache_mounts(self, key: str, gen: int, mounts: list[Mount]) -> None:
        """Remember the mounts of `key` unless the store changed since `gen` was read.

        The mounts of a snapshot without an image are a pure function of its id, kind, parent
        chain, labels and the config; all but labels are fixed for a key until Commit or Remove,
        labels change only through Update. Those three bump the generation *after* their
        transaction, so a Mounts that read the store before them cannot store a stale answer.
        """
        with self._mount_lock:
            if gen == self._mount_gen:
                if len(self._mount_cache) > 65536:
                    self._mount_cache.clear()
                self._mount_cache[key] = tuple(mounts)

    def _invalidate_mounts(self, key: str | None = None) -> None:
        """Forget the cached mounts of `key` (of every key when None): its record changed."""
        with self._mount_lock:
            self._mount_gen += 1
            if key is None:
                self._mount_cache.clear()
            else:
                self._mount_cache.pop(key, None)

    def _mounts_for(
        self,
        key: str,
        snap: Snapshot,
        labels: dict[str, str],
        create: bool,
        links: list[ChainLink] | None = None,
        gen: int | None = None,
    ) -> list[Mount]:
        """Resolve a lazily served image under the chain (if any), then ask the mount producers.

        With `gen` (the cache generation read before the store was), mounts that involve no
        image are cached; an image's mounts are always re-resolved (its instance may change).
        """
        request = self._request(key, snap, labels)
        source: ImageSource | None = None
        # A layer being unpacked (and not claimed) gets native mounts: containerd writes the
        # layer's content into it, as with the overlayfs snapshotter.
        if snap.parent_ids and not L.is_unpack_layer(labels):
            if links is None:
                links = self.ms.chain(key)
            chain = [
                ChainEntry(id=c.id, name=c.name, labels=c.labels, upper=self._upper(c.id)) for c in links
            ]
            source = self._find_image(key, chain)
            if source is not None:
                if self.images is None:
                    raise NoImageService(
                        f"snapshot {key}: its parent chain holds a {source.format} image "
                        f"(meta snapshot {source.meta_id}) but no image service is configured"
                    )
                meta_labels: dict[str, str] = {}
                for c in chain:
                    if c.id == source.meta_id:
                        meta_labels = dict(c.labels)
                meta_labels.update(source.labels)
                instance = None if create else self.images.get_instance(source.meta_id)
                if instance is None:
                    instance = self.images.ensure_instance(source, meta_labels)
                request = MountRequest(
                    id=request.id,
                    key=request.key,
                    kind=request.kind,
                    upper=request.upper,
                    work=request.work,
                    lowers=request.lowers,
                    labels=request.labels,
                    image_mountpoint=instance.mountpoint,
                    image=source,
                    instance=instance,
                )
        mounts = self.hooks.mounts(request=request, config=self.config)
        if mounts is None:
            raise SnapshotterError(f"snapshot {key}: no mount producer answered")
        result = list(mounts)
        if gen is not None and source is None:
            self._cache_mounts(key, gen, result)
        return result

    def _create(
        self, kind: Kind, key: str, parent: str, labels: dict[str, str], links: list[ChainLink]
    ) -> Snapshot:
        """Make the directory and the record atomically (see the module docstring)."""
        with self._inflight_lock:
            tmp = Path(tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir))
            self._inflight.add(tmp.name)
        try:
            (tmp / "fs").mkdir(mode=0o755)
            os.chmod(tmp / "fs", 0o755)  # independent of the umask, like containerd
            if kind == Kind.ACTIVE:
                (tmp / "work").mkdir(mode=0o711)

            def place(snap: Snapshot) -> None:
                if snap.parent_ids:
                    pst = os.stat(self._upper(snap.parent_ids[0]))
                    os.lchown(tmp / "fs", pst.st_uid, pst.st_gid)
                target = self.paths.snapshot_dir(snap.id)
                if target.exists():
                    # Left by a crash after a rename whose transaction never committed: the id
                    # was handed out again, so nothing references that directory.
                    remove_tree(target)
                os.rename(tmp, target)

            return self.ms.create(kind, key, parent, labels, before_commit=place, chain_out=links)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            with self._inflight_lock:
                self._inflight.discard(tmp.name)

    def _prepare_or_view(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        L.validate(labels)
        links: list[ChainLink] = []
        gen = self._mount_gen
        snap = self._create(kind, key, parent, labels, links)
        try:
            if kind == Kind.ACTIVE and L.is_unpack_layer(labels):
                self._maybe_claim(key, parent, labels, snap, links)
            return self._mounts_for(key, snap, labels, create=True, links=links, gen=gen)
        except AlreadyExists:
            raise
        except BaseException:
            # Leave nothing behind so containerd can retry with the same key.
            with contextlib.suppress(SnapshotterError):
                self.remove(key)
            raise

    def _maybe_claim(
        self, key: str, parent: str, labels: dict[str, str], snap: Snapshot, links: list[ChainLink]
    ) -> None:
        target = labels[L.TARGET_SNAPSHOT_REF]
        chain = tuple(
            ChainEntry(id=c.id, name=c.name, labels=c.labels, upper=self._upper(c.id))
            for c in links  # the parents `_create` read (no second walk of the store)
        )
        layer = Layer(
            key=key, parent=parent, target=target, labels=dict(labels),
            snapshot_id=snap.id, upper=self._upper(snap.id), chain=chain,
        )
        claim: LayerClaim | None = None
        for fmt in self.formats:
            claim = fmt.format.claim_layer(layer, self.config)
            if claim is not None:
                break
        if claim is None:
            return
        try:
            self._commit(target, key, {**labels, **claim.labels}, remote=True)
        except AlreadyExists:
            # Another pull of the same layer won the race: ours is redundant.
            self.remove(key)
        raise AlreadyExists(f'target snapshot "{target}": already exists')

    def _commit(self, name: str, key: str, labels: dict[str, str], remote: bool) -> Info:
        L.validate(labels)
        rec = self.ms.get(key)
        usage = disk_usage(self._upper(rec.id)) if rec.info.kind == Kind.ACTIVE else Usage()
        try:
            committed = self.ms.commit(key, name, usage, labels)
        finally:
            self._invalidate_mounts(key)
        self._event(lambda: self.hooks.snapshot_committed(info=committed.info, remote=remote),
                    "nydus_snapshot_committed")  # fmt: skip
        return committed.info

    def _find_image(self, key: str, chain: list[ChainEntry]) -> ImageSource | None:
        for fmt in self.formats:
            source = fmt.format.find_image(key, chain, self.config)
            if source is not None:
                return source
        return None

    def _event(self, fire: Callable[[], None], name: str) -> None:
        """Broadcast an event after the fact: a listener's failure is logged, never returned to
        containerd (the operation it reports has already happened)."""
        try:
            fire()
        except Exception:
            log.exception("event hook %s failed", name)

    # ------------------------------------------------------------------ containerd operations

    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Mount]:
        """Create an Active snapshot (or take a layer lazily, answering AlreadyExists)."""
        return self._prepare_or_view(Kind.ACTIVE, key, parent, dict(labels or {}))

    def view(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Mount]:
        """Create a read-only View of `parent`."""
        return self._prepare_or_view(Kind.VIEW, key, parent, dict(labels or {}))

    def mounts(self, key: str) -> list[Mount]:
        """The mounts of an Active or View snapshot, re-resolving a lazily served image."""
        cached = self._mount_cache.get(key)
        if cached is not None:
            return list(cached)
        gen = self._mount_gen
        snap, labels, links = self.ms.resolve(key)
        return self._mounts_for(key, snap, labels, create=False, links=links, gen=gen)

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> Info:
        """Commit the Active `key` as `name` (same id, labels replaced, usage stored)."""
        return self._commit(name, key, dict(labels or {}), remote=False)

    def remove(self, key: str) -> Info:
        """Delete a snapshot's record; its directory goes now (sync_remove) or in `cleanup`."""
        moved: list[Path] = []
        served: list[Path] = []

        def move_aside(rec: Record) -> None:
            src = self.paths.snapshot_dir(rec.id)
            if self.images is not None and self.images.get_instance(rec.id) is not None:
                # A meta snapshot whose image is still mounted (its mountpoint may live in this
                # directory): renaming would move the live mount under the daemon manager's
                # feet. Leave it in place; without its record it is an orphan that is deleted
                # once the image service has released the instance (below or in Cleanup).
                served.append(src)
                return
            dst = self.snapshots_dir / f"rm-{rec.id}"
            try:
                os.rename(src, dst)
                moved.append(dst)
            except FileNotFoundError:
                log.warning("snapshot %s (%s) had no directory", key, rec.id)

        try:
            rec = self.ms.remove(key, before_commit=move_aside)
        except BaseException:
            for dst in moved:  # the record stays: so must its directory
                os.rename(dst, self.paths.snapshot_dir(dst.name[3:]))
            raise
        finally:
            self._invalidate_mounts(key)
        if self.config.snapshot.sync_remove:
            if self.images is not None and served:
                self.images.release_unused(self.ms.ids())
            for dst in moved + served:
                remove_tree(dst)
        self._event(lambda: self.hooks.snapshot_removed(info=rec.info), "nydus_snapshot_removed")
        return rec.info

    def stat(self, key: str) -> Info:
        return self.ms.get(key).info

    def update(self, info: Info, paths: list[str] | tuple[str, ...] = ()) -> Info:
        L.validate(info.labels)
        try:
            return self.ms.update(info, list(paths))
        finally:
            # Labels feed the mounts of the snapshot and (through the image lookup) of every
            # descendant: drop them all; Update is rare.
            self._invalidate_mounts()

    def list(self, filter_strings: list[str] | tuple[str, ...] = ()) -> list[Info]:
        """Every snapshot matching containerd filter strings (OR of strings, AND within one)."""
        match = filters.parse(list(filter_strings))
        return self.ms.walk(match)

    def usage(self, key: str) -> Usage:
        """Active: walk the upper dir now; otherwise the value stored at commit."""
        rec = self.ms.get(key)
        if rec.info.kind == Kind.ACTIVE:
            return disk_usage(self._upper(rec.id))
        return rec.usage

    def cleanup(self) -> None:
        """Delete directories no record names; let the image service drop unused instances."""
        live = self.ms.ids()
        if self.images is not None:
            self.images.release_unused(live)
        # Ids are listed before the directories: a snapshot created in between has its
        # directory renamed in (under the metastore lock) only after it got its id, so re-check.
        # The mount table is read once, after the image service let go of what it released:
        # an orphan directory gets no new mounts.
        points: list[str] | None = None
        for entry in os.scandir(self.snapshots_dir):
            name = entry.name
            if name in live or not entry.is_dir(follow_symlinks=False):
                continue
            with self._inflight_lock:
                if name in self._inflight:
                    continue
            if name.isdigit() and self.ms.exists_id(name):
                continue
            log.info("cleanup: removing orphan snapshots/%s", name)
            if points is None:
                points = mount_points()
            remove_tree(Path(entry.path), points)

    def close(self) -> None:
        self.ms.close()
