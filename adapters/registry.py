"""The adapter registry: `<root>/<name>/<version>/` folders plus `<root>/<name>/aliases.json`, on a local
directory or any fsspec URL. Publish is atomic; servers poll `snapshot` to pick up new versions.

A version exists once its loraswap.json exists (written last), so a crash mid-publish is never visible.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from adapters.bases import cache_dir as loraswap_cache_dir
from adapters.errors import AdapterConflictError, AdapterNotFoundError, LoraswapError, RegistryError
from adapters.format import validate_adapter
from adapters.manifest import MANIFEST_FILE, Manifest
from adapters.ref import AdapterRef, validate_alias, validate_name

ALIASES_FILE = "aliases.json"
TMP_PREFIX = ".tmp-"
log = logging.getLogger(__name__)


def resolve_in(ref: AdapterRef, versions: list[int], aliases: dict[str, int]) -> tuple[str, int]:
    """The resolve rule, over one name's listing: `name@3` pins, `name@alias` follows the alias, `name` is
    `name@stable` if set, else the newest. Raises AdapterNotFoundError. `Registry.resolve` applies it to a
    fresh listing, a server's registry watch to each name of one `snapshot`."""
    if not versions:
        raise AdapterNotFoundError(f"adapter {ref.name!r} not found in the registry")
    if ref.version is not None:
        if ref.version not in versions:
            raise AdapterNotFoundError(f"adapter {ref} not found (versions: {versions})")
        return ref.name, ref.version
    if ref.alias is not None:
        if ref.alias not in aliases:
            raise AdapterNotFoundError(f"adapter {ref.name!r} has no alias {ref.alias!r}")
        return ref.name, aliases[ref.alias]
    return ref.name, aliases.get("stable", versions[-1])


def _copy_file(src: Path, dst: Any) -> None:
    """Stream one local file into an open destination file (a seam for tests that simulate a full disk)."""
    with open(src, "rb") as handle:
        shutil.copyfileobj(handle, dst, 1 << 20)


def _after_file_written(path: str) -> None:
    """Hook called after each file of a publish is written (tests use it to crash mid-publish)."""


@contextmanager
def _io(action: str) -> Iterator[None]:
    try:
        yield
    except LoraswapError:
        raise
    except OSError as exc:
        raise RegistryError(f"registry I/O failed while {action}: {exc}") from exc


class Registry:
    """Adapters stored under one root, local or remote (fsspec)."""

    def __init__(self, url: str | Path, *, cache_dir: str | Path | None = None) -> None:
        self.url = str(url)
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)
        base_cache = Path(cache_dir) if cache_dir else loraswap_cache_dir() / "registry"
        self.cache_dir = base_cache / hashlib.sha256(self.url.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    def _path(self, *parts: str | int) -> str:
        return "/".join([self.root, *(str(p) for p in parts)])

    # ---- reading ----

    def _listing(self, name: str = "*") -> dict[str, list[int]]:
        with _io("listing"):
            found = self.fs.glob(self._path(name, "*", MANIFEST_FILE))
        versions: dict[str, list[int]] = {}
        for path in found:
            adapter, version = path.rstrip("/").split("/")[-3:-1]
            if version.isdigit() and not adapter.startswith("."):
                versions.setdefault(adapter, []).append(int(version))
        return {k: sorted(v) for k, v in sorted(versions.items())}

    def names(self) -> list[str]:
        return list(self._listing())

    def versions(self, name: str) -> list[int]:
        return self._listing(validate_name(name)).get(name, [])

    def aliases(self, name: str) -> dict[str, int]:
        path = self._path(validate_name(name), ALIASES_FILE)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise RegistryError(f"registry I/O failed while reading aliases of {name}: {exc}") from exc
        try:
            aliases = json.loads(data)
            return {str(k): int(v) for k, v in aliases.items()}
        except (ValueError, AttributeError, TypeError) as exc:
            raise RegistryError(f"{path}: invalid aliases file ({exc})") from None

    def resolve(self, ref: str | AdapterRef) -> tuple[str, int]:
        """(name, version) that `ref` names now (`resolve_in`'s rule)."""
        ref = AdapterRef.parse(ref) if isinstance(ref, str) else ref
        versions = self.versions(ref.name)
        aliases = self.aliases(ref.name) if versions and ref.version is None else {}
        return resolve_in(ref, versions, aliases)

    def manifest(self, name: str, version: int) -> Manifest:
        path = self._path(validate_name(name), int(version), MANIFEST_FILE)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise AdapterNotFoundError(f"adapter {name}@{version} not found in the registry") from None
        except OSError as exc:
            raise RegistryError(f"registry I/O failed while reading {name}@{version}: {exc}") from exc
        return Manifest.parse(data, f"{name}@{version}/{MANIFEST_FILE}")

    def fetch(self, name: str, version: int) -> Path:
        """A local folder with the version's files: the folder itself when local, else a verified cache copy."""
        manifest = self.manifest(name, version)
        if self.local:
            return Path(self._path(name, version))
        target = self.cache_dir / name / str(version)
        if (target / MANIFEST_FILE).is_file():
            return target
        tmp = target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            with _io(f"fetching {name}@{version}"):
                tmp.mkdir(parents=True)
                for rel in [*manifest.files, MANIFEST_FILE]:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    self.fs.get_file(self._path(name, version, rel), str(tmp / rel))
            validate_adapter(tmp)  # hashes, format: a corrupt download never lands in the cache
            try:
                tmp.rename(target)
            except OSError:  # another process cached it first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def snapshot(self) -> dict[str, dict]:
        """`{name: {"versions": [...], "aliases": {...}}}`: one listing of everything, for a server's watch."""
        return {name: {"versions": vs, "aliases": self.aliases(name)} for name, vs in self._listing().items()}

    # ---- writing ----

    def publish(self, folder: str | Path, *, name: str | None = None, version: int | None = None) -> Manifest:
        """Validate `folder`, copy it to a temp path, verify, then move it into place; raise if the version exists."""
        src = Path(folder)
        manifest = validate_adapter(src)
        name = validate_name(name or manifest.name)
        existing = self.versions(name)
        version = int(version) if version is not None else max(existing, default=0) + 1
        if version < 1:
            raise AdapterConflictError(f"invalid version {version}: versions start at 1")
        if version in existing:
            raise AdapterConflictError(f"adapter {name}@{version} already exists in the registry")
        manifest = manifest.model_copy(update={"name": name, "version": version})
        tmp = self._path(f"{TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            with _io(f"publishing {name}@{version}"):
                self._write_tmp(src, manifest, tmp)
                self._verify_tmp(manifest, tmp)
                self._move_into_place(manifest, tmp, self._path(name, version))
        finally:
            self._remove_quietly(tmp)
        return manifest

    def _write_tmp(self, src: Path, manifest: Manifest, tmp: str) -> None:
        self.fs.makedirs(tmp, exist_ok=True)
        for rel in manifest.files:
            dst = f"{tmp}/{rel}"
            self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
            with self.fs.open(dst, "wb") as out:
                _copy_file(src / rel, out)
            _after_file_written(dst)
        self.fs.pipe_file(f"{tmp}/{MANIFEST_FILE}", manifest.to_json().encode())
        _after_file_written(f"{tmp}/{MANIFEST_FILE}")

    def _verify_tmp(self, manifest: Manifest, tmp: str) -> None:
        for rel, expected in manifest.files.items():
            digest = hashlib.sha256()
            with self.fs.open(f"{tmp}/{rel}", "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != expected:
                raise RegistryError(f"publish verification failed: {rel} differs after the copy")

    def _move_into_place(self, manifest: Manifest, tmp: str, final: str) -> None:
        if self.local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            try:
                os.rename(tmp, final)  # atomic; refuses an existing non-empty folder
            except OSError as exc:
                if os.path.exists(final):
                    raise AdapterConflictError(
                        f"adapter {manifest.name}@{manifest.version} already exists"
                    ) from None
                raise exc
            return
        # Object stores have no directory rename: move the files, the manifest (which makes it visible) last.
        if self.fs.exists(f"{final}/{MANIFEST_FILE}"):
            raise AdapterConflictError(f"adapter {manifest.name}@{manifest.version} already exists")
        for rel in [*manifest.files, MANIFEST_FILE]:
            self.fs.mv(f"{tmp}/{rel}", f"{final}/{rel}")

    def _remove_quietly(self, path: str) -> None:
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except OSError as exc:
            log.warning("could not remove %s: %s", path, exc)

    def _write_aliases(self, name: str, aliases: dict[str, int]) -> None:
        data = (json.dumps(dict(sorted(aliases.items())), indent=2) + "\n").encode()
        path = self._path(name, ALIASES_FILE)
        with _io(f"writing aliases of {name}"):
            if self.local:
                tmp = f"{path}.{uuid.uuid4().hex}.tmp"
                Path(tmp).write_bytes(data)
                os.replace(tmp, path)  # readers see the old or the new file, never half of one
            else:
                self.fs.pipe_file(path, data)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        validate_alias(alias)
        if int(version) not in self.versions(name):
            raise AdapterNotFoundError(
                f"cannot point {name}@{alias} at version {version}: {name}@{version} does not exist"
            )
        aliases = self.aliases(name)
        aliases[alias] = int(version)
        self._write_aliases(name, aliases)

    def remove_alias(self, name: str, alias: str) -> None:
        aliases = self.aliases(name)
        if alias not in aliases:
            raise AdapterNotFoundError(f"adapter {name!r} has no alias {alias!r}")
        del aliases[alias]
        self._write_aliases(name, aliases)

    def delete(self, name: str, version: int | None = None) -> None:
        """Delete one version (refused while an alias points at it) or, with no version, the whole adapter."""
        versions = self.versions(name)
        if version is None:
            if not versions and not self.fs.exists(self._path(name)):
                raise AdapterNotFoundError(f"adapter {name!r} not found in the registry")
            self._vanish(self._path(name))
            return
        if int(version) not in versions:
            raise AdapterNotFoundError(f"adapter {name}@{version} not found in the registry")
        pointing = sorted(a for a, v in self.aliases(name).items() if v == int(version))
        if pointing:
            raise AdapterConflictError(
                f"{name}@{version} is aliased as {', '.join(pointing)}; move or remove the alias first"
            )
        self._vanish(self._path(name, int(version)))

    def _vanish(self, path: str) -> None:
        """Make a folder invisible at once (rename aside / drop its manifest first), then remove it."""
        with _io(f"deleting {path}"):
            if self.local:
                aside = self._path(f"{TMP_PREFIX}del-{uuid.uuid4().hex}")
                os.rename(path, aside)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                for manifest in self.fs.glob(f"{path}/{MANIFEST_FILE}") + self.fs.glob(
                    f"{path}/*/{MANIFEST_FILE}"
                ):
                    self.fs.rm_file(manifest)
                self.fs.rm(path, recursive=True)
