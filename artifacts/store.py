"""Content-addressed artifact store: every adapter folder and result file, kept by its sha256.

An artifact is a folder. Its id is the sha256 of its manifest, the `sha256sum` listing of its files
in sorted relative-path order:

    <sha256 of file bytes>  <relative/path>\\n      (one line per regular file, paths sorted)

so a folder's id can be recomputed with coreutils:
`cd DIR && find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs -d '\\n' sha256sum | sha256sum`.
A single result file (`put_file`, `put_bytes`) is stored as a one-file folder, so its id is
`sha256sum FILE | sha256sum` with the file's name as written; `get_file` returns the file itself.

Layout under `root`:

    root/ab/<sha>/            the artifact (read-only files); `get(sha)` returns this folder
    root/ab/<sha>.manifest    its manifest (sha256 of these bytes == <sha>): names a corrupt file
    root/tmp/                 work in progress, on the same filesystem as the artifacts, and the
                              scratch stores of `scratch()`

Writes are atomic: files are copied into root/tmp (hashed as they are copied), fsynced, the manifest
is renamed into place, then the folder is renamed to root/ab/<sha> and the parent directory is
fsynced. A kill at any instant leaves either no artifact or a complete one (plus, at worst, a
leftover under root/tmp or a manifest without a folder, which `gc` removes). The same content is
stored once; a second put of it only refreshes the folder's mtime (gc's age test).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from es_core.manifest import first_difference

MANIFEST_SUFFIX = ".manifest"
TMP_DIR = "tmp"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a write refused for want of space


class ArtifactError(ValueError):
    """A missing, corrupt or unknown artifact: one line naming the file."""


@dataclass(frozen=True)
class ArtifactRef:
    sha256: str
    path: Path  # the artifact folder


# --- hashing ------------------------------------------------------------------------------------


def _check_name(rel: str, where: Path) -> None:
    # The manifest is line-based and must stay `sha256sum`-compatible (it escapes `\` and newlines).
    if "\n" in rel or "\\" in rel or not rel:
        raise ArtifactError(f"{where}: file name {rel!r} cannot be stored (no newlines or backslashes)")


def _files(folder: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every regular file under folder, sorted by relative path."""
    if not folder.is_dir():
        raise ArtifactError(f"not a folder: {folder}")
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                raise ArtifactError(f"{p}: symbolic links cannot be stored")
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_file():
                raise ArtifactError(f"{p}: not a regular file")
            rel = p.relative_to(folder).as_posix()
            _check_name(rel, p)
            out.append((rel, p))
    if not out:
        raise ArtifactError(f"{folder}: an empty folder is not an artifact")
    return sorted(out)


_SHA_MEMO: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read once per process: memoized by path, size, mtime and inode (a
    file rewritten or replaced changes one of them), so the CLI's check of a warm start before a
    resume and the run's own check hash it once. A new process (`verify`) always reads it."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def manifest_text(entries: Iterable[tuple[str, str]]) -> str:
    """The manifest of (relative path, file sha256) pairs: `sha256sum` lines in path order."""
    return "".join(f"{digest}  {rel}\n" for rel, digest in sorted(entries))


def hash_dir(folder: str | Path) -> str:
    """The artifact id a folder would get (nothing is written)."""
    folder = Path(folder)
    manifest = manifest_text((rel, file_sha256(p)) for rel, p in _files(folder))
    return hashlib.sha256(manifest.encode()).hexdigest()


def files_sha256(files: dict[str, bytes]) -> str:
    """The id `ArtifactStore.put_files(files)` gives, computed without writing."""
    return hashlib.sha256(manifest_text((rel, hashlib.sha256(data).hexdigest()) for rel, data in files.items()).encode()).hexdigest()


def _parse_manifest(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        digest, _, rel = line.partition("  ")
        out[rel] = digest
    return out


# --- durable file operations ---------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_hashing(src: BinaryIO, dst: Path) -> str:
    h = hashlib.sha256()
    with open(dst, "xb") as out:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(dst, 0o444)
    return h.hexdigest()


class _BytesReader:
    def __init__(self, data: bytes):
        self._view, self._pos = memoryview(data), 0

    def read(self, n: int) -> bytes:
        chunk = self._view[self._pos : self._pos + n].tobytes()
        self._pos += len(chunk)
        return chunk


# --- the store -----------------------------------------------------------------------------------


class ArtifactStore:
    """Artifacts under `root` (a data dir's `artifacts/` folder), addressed by sha256."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # paths
    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def manifest_path(self, sha256: str) -> Path:
        """The artifact's manifest, beside its folder: with the folder, all it takes on disk."""
        return self.root / sha256[:2] / f"{sha256}{MANIFEST_SUFFIX}"

    @property
    def tmp(self) -> Path:
        return self.root / TMP_DIR

    @contextmanager
    def scratch(self, prefix: str = "scratch") -> Iterator["ArtifactStore"]:
        """A store for files written for one piece of work and kept by no one after it (the adapter
        folders a backend loads), under tmp/: on this store's filesystem, so a put there renames as
        here, and in its data dir, which a server on another host of a Ray cluster sees too. Its
        folder is made by its first put (a block that writes nothing makes nothing) and removed when
        the block ends, whether it succeeded or raised; after a kill, `gc` removes it with the other
        leftovers under tmp/ once it is older than gc's minimum age."""
        scratch = ArtifactStore(self.tmp / f"{prefix}-{os.getpid()}-{uuid.uuid4().hex}")
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch.root, ignore_errors=True)

    # writing
    def put_dir(self, folder: str | Path) -> ArtifactRef:
        """Store a folder (e.g. a PEFT adapter) by content; returns its id and stored folder."""
        folder = Path(folder)
        files = _files(folder)

        def entries():
            for rel, p in files:
                with open(p, "rb") as f:
                    yield rel, f

        return self._put(entries())

    def put_file(self, path: str | Path) -> ArtifactRef:
        """Store one file as a one-file artifact named after it."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"not a file: {path}")
        _check_name(path.name, path)

        def entries():
            with open(path, "rb") as f:
                yield path.name, f

        return self._put(entries())

    def put_bytes(self, data: bytes, name: str) -> ArtifactRef:
        """Store bytes as a one-file artifact holding the file `name` (e.g. samples.jsonl)."""
        if "/" in name or name in ("", ".", ".."):
            raise ArtifactError(f"artifact file name {name!r} must be a plain file name")
        return self.put_files({name: bytes(data)})  # which checks the name's characters

    def put_files(self, files: dict[str, bytes]) -> ArtifactRef:
        """Store a folder given as {relative path: bytes}: nothing written outside the store first."""
        if not files:
            raise ArtifactError("an empty folder is not an artifact")
        for rel in files:
            _check_name(rel, Path(rel))
            if rel.startswith("/") or any(part in ("", ".", "..") for part in rel.split("/")):
                raise ArtifactError(f"artifact file name {rel!r} must be a relative path")
        return self._put((rel, _BytesReader(files[rel])) for rel in sorted(files))

    def _put(self, entries: Iterator[tuple[str, BinaryIO]]) -> ArtifactRef:
        at = [self.tmp]  # the path being written: a full disk said "[Errno 28] No space left on device", naming none
        try:
            return self._put_at(entries, at)
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise ArtifactError(f"cannot write {at[0]}: {exc.strerror}; free space on that filesystem, then resume the run "
                                    "(nothing half-written is kept)") from None
            raise

    def _put_at(self, entries: Iterator[tuple[str, BinaryIO]], at: list[Path]) -> ArtifactRef:
        self.tmp.mkdir(parents=True, exist_ok=True)
        work = self.tmp / f"put-{os.getpid()}-{uuid.uuid4().hex}"
        tmp_manifest = work.with_name(work.name + MANIFEST_SUFFIX)
        at[0] = work
        work.mkdir()
        try:
            hashed = []
            made_dirs = {work}
            for rel, src in entries:
                dst = work / rel
                if dst.parent not in made_dirs:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    made_dirs.add(dst.parent)
                at[0] = dst
                hashed.append((rel, _copy_hashing(src, dst)))
            at[0] = work
            for d in sorted(made_dirs, key=lambda p: len(p.parts), reverse=True):
                _fsync_dir(d)
            manifest = manifest_text(hashed)
            sha = hashlib.sha256(manifest.encode()).hexdigest()
            final = self.path(sha)
            if final.is_dir():  # stored before: keep one copy, mark it as recently used
                os.utime(final)
                return ArtifactRef(sha, final)
            shard = final.parent
            if not shard.is_dir():
                shard.mkdir(parents=True, exist_ok=True)
                _fsync_dir(self.root)
            # the manifest first: a manifest without a folder is not an artifact (gc removes it)
            at[0] = tmp_manifest
            with open(tmp_manifest, "x") as f:
                f.write(manifest)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_manifest, self.manifest_path(sha))
            try:
                os.rename(work, final)  # the commit point
            except OSError:
                if not final.is_dir():  # a concurrent put of the same content won: fine
                    raise
            _fsync_dir(shard)
            return ArtifactRef(sha, final)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
            tmp_manifest.unlink(missing_ok=True)

    # reading
    def exists(self, sha256: str) -> bool:
        return bool(_SHA_RE.match(sha256 or "")) and self.path(sha256).is_dir()

    def get(self, sha256: str, verify: bool = True) -> Path:
        """The artifact's folder, after checking every file against its id (one-line ArtifactError)."""
        if not _SHA_RE.match(sha256 or ""):
            raise ArtifactError(f"not an artifact id (64 lowercase hex digits): {sha256!r}")
        folder = self.path(sha256)
        if not folder.is_dir():
            raise ArtifactError(f"artifact {sha256} is missing: {folder}")
        if verify:
            self._verify(sha256, folder)
        return folder

    def get_file(self, sha256: str, verify: bool = True) -> Path:
        """The file of a one-file artifact (put_file / put_bytes)."""
        folder = self.get(sha256, verify)
        files = _files(folder)
        if len(files) != 1:
            raise ArtifactError(f"artifact {sha256} holds {len(files)} files, not one: {folder}")
        return files[0][1]

    def _verify(self, sha256: str, folder: Path) -> None:
        try:
            actual = {rel: file_sha256(p) for rel, p in _files(folder)}
        except ArtifactError as exc:
            raise ArtifactError(f"artifact {sha256} is corrupt: {exc}") from None
        if hashlib.sha256(manifest_text(actual.items()).encode()).hexdigest() == sha256:
            return
        # Name the culprit from the stored manifest when it is itself intact.
        mpath = self.manifest_path(sha256)
        expected = None
        if mpath.is_file():
            text = mpath.read_bytes()
            if hashlib.sha256(text).hexdigest() == sha256:
                expected = _parse_manifest(text.decode())
        if expected is None:
            raise ArtifactError(f"artifact {sha256} is corrupt: its content hashes to {hash_dir(folder)} ({folder})")
        difference = first_difference(expected, actual)
        if difference is not None:
            rel, what = difference
            said = {"missing": f"file missing: {folder / rel}", "unexpected": f"unexpected file: {folder / rel}",
                    "changed": f"{folder / rel} has sha256 {actual.get(rel)}, expected {expected.get(rel)}"}[what]
            raise ArtifactError(f"artifact {sha256} is corrupt: {said}")
        raise ArtifactError(f"artifact {sha256} is corrupt ({folder})")  # pragma: no cover - unreachable

    def resolve(self, prefix: str) -> str:
        """The one stored id starting with `prefix` (at least 4 hex digits)."""
        prefix = prefix.lower()
        if not re.match(r"^[0-9a-f]{4,64}$", prefix):
            raise ArtifactError(f"not an artifact id or prefix (4+ hex digits): {prefix!r}")
        shard = self.root / prefix[:2]
        found = sorted(p.name for p in shard.iterdir() if p.is_dir() and p.name.startswith(prefix)) if shard.is_dir() else []
        if not found:
            raise ArtifactError(f"no artifact {prefix} in {self.root}")
        if len(found) > 1:
            raise ArtifactError(f"artifact prefix {prefix} is ambiguous ({len(found)} matches)")
        return found[0]

    # maintenance
    def iter_artifacts(self) -> Iterator[tuple[str, Path]]:
        """(sha256, folder) of every stored artifact."""
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.iterdir()):
            if len(shard.name) != 2 or not shard.is_dir():
                continue
            for p in sorted(shard.iterdir()):
                if p.is_dir() and _SHA_RE.match(p.name):
                    yield p.name, p

    def verify_all(self) -> list[str]:
        """Check every artifact; returns one line per corrupt artifact (empty: all intact)."""
        problems = []
        for sha, folder in self.iter_artifacts():
            try:
                self._verify(sha, folder)
            except ArtifactError as exc:
                problems.append(str(exc))
        return problems

    def size(self, sha256: str) -> int:
        return sum(p.stat().st_size for _, p in _files(self.path(sha256))) + self._manifest_size(sha256)

    def _manifest_size(self, sha256: str) -> int:
        m = self.manifest_path(sha256)
        return m.stat().st_size if m.is_file() else 0

    def age_s(self, sha256: str) -> float:
        return time.time() - self.path(sha256).stat().st_mtime

    def remove(self, sha256: str) -> None:
        """Delete an artifact: it vanishes at once (renamed into tmp), then its bytes go."""
        folder = self.path(sha256)
        self.tmp.mkdir(parents=True, exist_ok=True)
        trash = self.tmp / f"gc-{os.getpid()}-{uuid.uuid4().hex}"
        os.rename(folder, trash)
        _fsync_dir(folder.parent)
        self.manifest_path(sha256).unlink(missing_ok=True)
        shutil.rmtree(trash, ignore_errors=True)

    def leftovers(self, min_age_s: float = 0.0) -> list[tuple[Path, int]]:
        """What a kill left under tmp/ (unfinished puts, scratch stores) and manifests without a
        folder, older than min_age_s (by the mtime of the entry itself)."""
        out = []
        now = time.time()
        if self.tmp.is_dir():
            for p in sorted(self.tmp.iterdir()):
                if now - p.lstat().st_mtime >= min_age_s:
                    out.append((p, _tree_size(p)))
        for shard in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if len(shard.name) != 2 or not shard.is_dir():
                continue
            for m in sorted(shard.glob(f"*{MANIFEST_SUFFIX}")):
                sha = m.name[: -len(MANIFEST_SUFFIX)]
                if not (shard / sha).is_dir() and now - m.stat().st_mtime >= min_age_s:
                    out.append((m, m.stat().st_size))
        return out


def _tree_size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
