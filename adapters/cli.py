"""The root of the `loraswap` console script, and its `loraswap adapter ...` subcommands.

Other subcommands (serve, train, eval) plug in through the `loraswap.commands` entry-point group, so this
package never imports service/ or training/. Exit codes: 0 ok, 1 refused/failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from adapters.errors import LoraswapError

ENTRY_POINT_GROUP = "loraswap.commands"
DEFAULT_REGISTRY = "./registry"


# ---- the root command ----


def _first_positional(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(
    argv: list[str], debug: bool = False
) -> tuple[argparse.ArgumentParser, dict[str, Exception]]:
    """The root parser with every plugin registered (only the named one when argv names a command)."""
    parser = argparse.ArgumentParser(
        prog="loraswap", description="Serve one base model with many LoRA adapters."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = _first_positional(argv)
    plugins = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if wanted in plugins:
        plugins = {
            wanted: plugins[wanted]
        }  # `loraswap adapter ...` does not import the server or the trainer
    registered: dict[str, Callable[[Any], None]] = {}
    failed: dict[str, Exception] = {}
    for name, entry_point in sorted(plugins.items()):
        try:
            register = entry_point.load()
            register(subparsers)
            registered[name] = register
        except Exception as exc:  # a broken plugin must not take the other commands down
            if debug:
                traceback.print_exc()
            failed[name] = exc
    if "adapter" not in registered and "adapter" not in failed and wanted in (None, "adapter"):
        register_adapter_commands(subparsers)  # running from a source tree without installed entry points
    return parser, failed


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `loraswap` script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser, failed = build_parser(argv, debug)
    wanted = _first_positional(argv)
    if wanted in failed:
        print(f"error: command {wanted!r} could not be loaded: {failed[wanted]}", file=sys.stderr)
        return 1
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
        return int(exc.code or 0)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        message = exc.message if isinstance(exc, LoraswapError) else f"{type(exc).__name__}: {exc}"
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        return 1


# ---- loraswap adapter ... ----


def registry_url(value: str | None) -> str:
    return value or os.environ.get("LORASWAP_REGISTRY") or DEFAULT_REGISTRY


def _open_registry(args: argparse.Namespace):
    from adapters.registry import Registry

    return Registry(registry_url(args.registry))


def load_base_model(name_or_path: str, task: str):
    """Load a base for fingerprinting (a seam: tests and callers may swap it)."""
    from transformers.utils import logging as hf_logging

    from adapters.bases import load_base

    # A CLI's stderr is for its one-line result: no progress bars or "newly initialised head" reports.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model, _tokenizer = load_base(name_or_path, task)
    return model


def _describe(name_or_path: str, task: str, source: str | Path | None = None):
    """Fingerprint the base `name_or_path`, loaded from `source` (a local folder) when given."""
    from adapters.fingerprint import describe_base
    from adapters.peft import BASE_TASKS

    task = BASE_TASKS.get(task, task)  # an embedding adapter is checked against the encoder as it is served
    return describe_base(load_base_model(str(source or name_or_path), task), name_or_path, task)


def _cmd_list(args: argparse.Namespace) -> int:
    snapshot = _open_registry(args).snapshot()
    if args.json:
        print(json.dumps(snapshot, indent=2))
        return 0
    for name, info in snapshot.items():
        weights = info["weights"]
        aliases = " ".join(f"{a}={v}" + (f"(weight {weights[a]:g})" if a in weights else "")
                           for a, v in sorted(info["aliases"].items()))
        versions = ",".join(str(v) for v in info["versions"])
        print(f"{name}\tversions={versions}" + (f"\taliases: {aliases}" if aliases else ""))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    registry = _open_registry(args)
    name, version = registry.resolve(args.ref)
    print(registry.manifest(name, version).to_json(), end="")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    """Check the adapter against --base, else against the base its manifest names when that base is
    local (an embedded default or a folder); never download one. Without a local base the base checks
    are skipped with a warning, or refused with --strict."""
    from adapters.bases import local_base
    from adapters.format import read_adapter
    from adapters.manifest import Manifest

    if not Path(args.path).is_dir():  # before reading the manifest, as read_adapter reports it
        raise LoraswapError(f"adapter folder {args.path} does not exist")
    manifest = Manifest.load(args.path)
    named = manifest.base_model.name
    base = None
    if args.base:
        base = _describe(args.base, manifest.task)
        checked = f"fingerprint and module shapes checked against base {args.base} (--base)"
    else:
        folder = local_base(named)
        if folder is not None:
            base = _describe(named, manifest.task, source=folder)
            checked = f"fingerprint and module shapes checked against base {named} (named by the manifest)"
    weights = read_adapter(args.path, base, max_rank=args.max_rank, max_bytes=args.max_bytes)
    m = weights.manifest
    if base is None:
        missing = (
            f"the base the manifest names, {named!r}, is not available locally (neither an installed"
            " embedded base nor a folder with config.json): fingerprint, module shapes and task not checked"
        )
        if args.strict:
            raise LoraswapError(f"{missing}; --strict refuses that (pass --base NAME|FOLDER to check)")
        print(f"warning: {missing}; pass --base NAME|FOLDER to check them", file=sys.stderr)
        checked = f"base {named} not available locally: fingerprint, module shapes and task not checked"
    print(
        f"ok: {m.name}@{m.version} ({m.task}, {len(weights.lora)} LoRA modules, {weights.nbytes} bytes; {checked})"
    )
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from adapters.format import import_peft_folder
    from adapters.peft import CONFIG_FILE, PEFT_TASKS, read_config
    from adapters.ref import validate_name

    src = Path(args.peft_dir)
    validate_name(args.name)
    config = read_config(src)  # refuses what cannot be served before the base is loaded
    base_name = args.base or config.get("base_model_name_or_path")
    if not base_name:
        raise LoraswapError(f"{CONFIG_FILE} names no base_model_name_or_path; pass --base")
    task = args.task or PEFT_TASKS.get(config.get("task_type") or "")
    if task is None:
        raise LoraswapError(f"cannot tell the task from task_type {config.get('task_type')!r}; pass --task")
    base = _describe(base_name, task)
    registry = None if args.no_publish else _open_registry(args)
    version = max(registry.versions(args.name), default=0) + 1 if registry else 1
    manifest = import_peft_folder(src, args.name, base_name, base, version=version, task=task)
    if registry is None:
        print(f"wrote {src / 'loraswap.json'} ({manifest.name}@{manifest.version})")
        return 0
    published = registry.publish(src)
    print(f"imported {published.name}@{published.version} into {registry.url}")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    registry = _open_registry(args)
    manifest = registry.publish(args.path, name=args.name, version=args.version)
    print(f"published {manifest.name}@{manifest.version} to {registry.url}")
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from adapters import promotion

    gate = promotion.Gate(args.min_requests, args.require_agreement, args.require_cosine)
    gated = gate != promotion.Gate()
    if gated and not args.server:
        raise LoraswapError("--min-requests/--require-agreement/--require-cosine read a server's shadow summary:"
                            " give --server URL")
    registry = _open_registry(args)
    name, version = registry.resolve(args.ref)
    if args.server:
        summary = promotion.fetch_summary(args.server, name, args.api_key)
        print(promotion.check(summary, version, gate))
    registry.set_alias(name, args.alias, version, args.weight)
    print(f"{name}@{args.alias} -> {version}" + ("" if args.weight is None else f" (weight {args.weight:g})"))
    return 0


def _cmd_unalias(args: argparse.Namespace) -> int:
    registry = _open_registry(args)
    registry.remove_alias(args.name, args.alias)
    print(f"removed {args.name}@{args.alias}")
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    from adapters.ref import AdapterRef

    registry = _open_registry(args)
    ref = AdapterRef.parse(args.ref)
    if ref.version is None and ref.alias is None:
        if not args.all:
            raise LoraswapError(
                f"refusing to delete every version of {ref.name} without --all (or name a version)"
            )
        registry.delete(ref.name)
        print(f"deleted {ref.name} (all versions)")
        return 0
    name, version = registry.resolve(ref)
    registry.delete(name, version)
    print(f"deleted {name}@{version}")
    return 0


def register_adapter_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `loraswap adapter list|inspect|validate|import|publish|promote|unalias|rm`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--registry",
        metavar="PATH|URL",
        help=f"registry root (default: $LORASWAP_REGISTRY, else {DEFAULT_REGISTRY})",
    )
    adapter = subparsers.add_parser("adapter", help="manage adapters in a registry")
    commands = adapter.add_subparsers(dest="adapter_command", metavar="SUBCOMMAND", required=True)

    p = commands.add_parser("list", parents=[common], help="list adapters, versions and aliases")
    p.add_argument("--json", action="store_true", help="print the registry snapshot as JSON")
    p.set_defaults(func=_cmd_list)

    p = commands.add_parser("inspect", parents=[common], help="print an adapter version's manifest")
    p.add_argument("ref", metavar="NAME[@V]")
    p.set_defaults(func=_cmd_inspect)

    p = commands.add_parser("validate", parents=[common], help="validate an adapter folder")
    p.add_argument("path", metavar="PATH")
    p.add_argument(
        "--base",
        help="base model (name or folder) to check the fingerprint and module shapes against"
        " (default: the base the manifest names, when it is embedded or a local folder)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail (exit 1) when the base cannot be checked because it is not available locally",
    )
    p.add_argument("--max-rank", type=int, default=64)
    p.add_argument("--max-bytes", type=int, default=512 * 2**20)
    p.set_defaults(func=_cmd_validate)

    p = commands.add_parser("import", parents=[common], help="import a plain PEFT LoRA folder and publish it")
    p.add_argument("peft_dir", metavar="PEFT_DIR")
    p.add_argument("--name", required=True)
    p.add_argument("--base", help="base model (default: base_model_name_or_path of adapter_config.json)")
    p.add_argument(
        "--task", choices=["classification", "generation", "embedding"], help="default: from the PEFT task_type"
    )
    p.add_argument("--no-publish", action="store_true", help="only write loraswap.json into PEFT_DIR")
    p.set_defaults(func=_cmd_import)

    p = commands.add_parser("publish", parents=[common], help="publish a version folder that has a manifest")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--name", help="publish under this name (default: the manifest's)")
    p.add_argument("--version", type=int, help="version number (default: next)")
    p.set_defaults(func=_cmd_publish)

    p = commands.add_parser(
        "promote", parents=[common],
        help="point an alias at a version; with --server, only if its shadow comparison there passes the gate",
    )
    p.add_argument("ref", metavar="NAME@V")
    p.add_argument("--alias", default="stable", help="alias to move (default: stable)")
    p.add_argument("--weight", type=float, help="make the alias a canary taking this share (0-1) of NAME's"
                   " requests, sticky per caller; on the shadow alias: the share of requests copied")
    p.add_argument("--server", metavar="URL", help="a server that shadows NAME@V: read GET /v1/adapters/NAME/shadow")
    p.add_argument("--api-key", default=os.environ.get("LORASWAP_API_KEY"),
                   help="key for --server (default: $LORASWAP_API_KEY)")
    p.add_argument("--min-requests", type=int, default=0, help="shadowed requests needed (default 0)")
    p.add_argument("--require-agreement", type=float, help="classification: least share of same top labels")
    p.add_argument("--require-cosine", type=float, help="embeddings: least mean cosine to the served vectors")
    p.set_defaults(func=_cmd_promote)

    p = commands.add_parser("unalias", parents=[common], help="remove an alias (a canary's traffic returns)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--alias", required=True)
    p.set_defaults(func=_cmd_unalias)

    p = commands.add_parser("rm", parents=[common], help="delete a version (or, with --all, an adapter)")
    p.add_argument("ref", metavar="NAME@V")
    p.add_argument("--all", action="store_true", help="delete every version of NAME")
    p.set_defaults(func=_cmd_rm)
