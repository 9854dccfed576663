"""The adapter registry: `<root>/<name>/<version>/` folders plus `<root>/<name>/aliases.json`, on a local
directory or any fsspec URL. Publish is atomic; servers poll `snapshot` to pick up new versions.

A version exists once its loraswap.json exists (written last), so a crash mid-publish is never visible.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from adapters.bases import cache_dir as loraswap_cache_dir
from adapters.errors import (
    AdapterConflictError,
    AdapterNotFoundError,
    InvalidInputError,
    LoraswapError,
    RegistryError,
)
from adapters.format import validate_adapter
from adapters.manifest import MANIFEST_FILE, Manifest
from adapters.ref import AdapterRef, validate_alias, validate_name

ALIASES_FILE = "aliases.json"
TMP_PREFIX = ".tmp-"
SHADOW = "shadow"  # the alias whose version gets a copy of the traffic and never answers
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Traffic:
    """How requests for a plain `name` are shared out. Each weighted alias (a canary) takes its weight's share,
    in alias order; the rest goes to what `name` resolves to. `shadow`: (version, share of requests copied)."""

    canaries: tuple[tuple[int, float], ...] = ()
    shadow: tuple[int, float] | None = None


def traffic_in(aliases: dict[str, int], weights: dict[str, float]) -> Traffic:
    """The Traffic of one name's listing (`aliases`: alias -> version, `weights`: the weighted ones)."""
    canaries = tuple((aliases[a], w) for a, w in sorted(weights.items()) if a != SHADOW and w > 0)
    shadow = (aliases[SHADOW], weights.get(SHADOW, 1.0)) if SHADOW in aliases else None
    return Traffic(canaries, shadow)


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

    def _alias_entries(self, name: str) -> dict[str, tuple[int, float | None]]:
        """alias -> (version, weight or None). The file maps an alias to a version, or to
        `{"version": v, "weight": w}` for a weighted one."""
        path = self._path(validate_name(name), ALIASES_FILE)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise RegistryError(f"registry I/O failed while reading aliases of {name}: {exc}") from exc
        try:
            out = {}
            for alias, entry in json.loads(data).items():
                if isinstance(entry, dict):
                    weight = entry.get("weight")
                    out[str(alias)] = (int(entry["version"]), None if weight is None else float(weight))
                else:
                    out[str(alias)] = (int(entry), None)
            return out
        except (ValueError, AttributeError, TypeError, KeyError) as exc:
            raise RegistryError(f"{path}: invalid aliases file ({exc})") from None

    def aliases(self, name: str) -> dict[str, int]:
        return {alias: version for alias, (version, _) in self._alias_entries(name).items()}

    def listing(self, name: str) -> dict:
        """`{"versions", "aliases", "weights"}` of one name (a snapshot entry)."""
        return self._entry(name, self.versions(name))

    def _entry(self, name: str, versions: list[int]) -> dict:
        entries = self._alias_entries(name)
        return {"versions": versions, "aliases": {a: v for a, (v, _) in entries.items()},
                "weights": {a: w for a, (_, w) in entries.items() if w is not None}}

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
        """`{name: {"versions", "aliases", "weights"}}`: one listing of everything, for a server's watch."""
        return {name: self._entry(name, versions) for name, versions in self._listing().items()}

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

    def _write_aliases(self, name: str, entries: dict[str, tuple[int, float | None]]) -> None:
        plain = {a: v if w is None else {"version": v, "weight": w} for a, (v, w) in sorted(entries.items())}
        data = (json.dumps(plain, indent=2) + "\n").encode()
        path = self._path(name, ALIASES_FILE)
        with _io(f"writing aliases of {name}"):
            if self.local:
                tmp = f"{path}.{uuid.uuid4().hex}.tmp"
                Path(tmp).write_bytes(data)
                os.replace(tmp, path)  # readers see the old or the new file, never half of one
            else:
                self.fs.pipe_file(path, data)

    def set_alias(self, name: str, alias: str, version: int, weight: float | None = None) -> None:
        """Point `alias` at `version`; `weight` makes it a canary taking that share of the plain name's
        requests (for `shadow`: the share copied). `stable` takes no weight: it gets what canaries leave."""
        validate_alias(alias)
        if int(version) not in self.versions(name):
            raise AdapterNotFoundError(
                f"cannot point {name}@{alias} at version {version}: {name}@{version} does not exist"
            )
        entries = self._alias_entries(name)
        if weight is not None:
            weight = float(weight)
            if not math.isfinite(weight) or not 0.0 <= weight <= 1.0:
                raise InvalidInputError(f"alias weight must be between 0 and 1, got {weight}")
            if alias == "stable":
                raise InvalidInputError("the stable alias takes no weight: it serves what canaries leave")
            if alias != SHADOW:
                total = weight + sum(w or 0.0 for a, (_, w) in entries.items() if a not in (alias, SHADOW))
                if total > 1.0 + 1e-9:
                    raise InvalidInputError(f"canary weights of {name} would add up to {total:g} > 1")
        entries[alias] = (int(version), weight)
        self._write_aliases(name, entries)

    def remove_alias(self, name: str, alias: str) -> None:
        entries = self._alias_entries(name)
        if alias not in entries:
            raise AdapterNotFoundError(f"adapter {name!r} has no alias {alias!r}")
        del entries[alias]
        self._write_aliases(name, entries)

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
