"""`python -m hueyserve`: import a model from disk into a running deployment, or delete one,
through the API's admin routes (so it needs only the API's address and an admin key, not
Redis). Runs on any machine that reaches the API.

    python -m hueyserve import iris-onnx ./forest.onnx
    python -m hueyserve import sentiment ./sentiment/          # a folder: every file in it
    python -m hueyserve delete iris-onnx 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx2 as httpx

from hueyserve.artifacts import METADATA_FILE, RUNTIME_ARTIFACTS

DEFAULT_URL = "http://127.0.0.1:8000"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m hueyserve", description=__doc__.split("\n")[0])
    top.add_argument(
        "--url", default=os.environ.get("HUEYSERVE_URL", DEFAULT_URL),
        help=f"the API (env HUEYSERVE_URL; default {DEFAULT_URL})",
    )  # fmt: skip
    top.add_argument(
        "--api-key", default=os.environ.get("HUEYSERVE_API_KEY"),
        help="an admin key, when the API has keys (env HUEYSERVE_API_KEY)",
    )  # fmt: skip
    top.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (600)")
    commands = top.add_subparsers(dest="command", required=True)
    add = commands.add_parser("import", help="import a model file or folder as the next version")
    add.add_argument("name", help="the model's name (a new one, or the next version of one)")
    add.add_argument("path", type=Path, help="an artifact file, or a folder of them")
    add.add_argument("--runtime", choices=sorted(RUNTIME_ARTIFACTS), help="default: inferred")
    add.add_argument("--metadata", type=Path, help=f"a {METADATA_FILE} (default: the folder's)")
    add.add_argument(
        "--example", help="input rows for the smoke prediction, as JSON: '[[5.1, 3.5, 1.4, 0.2]]'"
    )
    add.add_argument(
        "--no-activate", action="store_true", help="add the version without making it active"
    )
    remove = commands.add_parser("delete", help="delete a version (not the active one) or a model")
    remove.add_argument("name")
    remove.add_argument("version", nargs="?", help="omit to delete the whole model")
    return top


def collect(path: Path, metadata_path: Path | None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The metadata and the files of an import from disk."""
    if path.is_dir():
        files = {
            p.name: p.read_bytes()
            for p in sorted(path.iterdir())
            if p.is_file() and p.name != METADATA_FILE and not p.name.startswith(".")
        }
        metadata_path = metadata_path or (path / METADATA_FILE)
    elif path.is_file():
        files = {path.name: path.read_bytes()}
    else:
        raise SystemExit(f"{path}: no such file or folder")
    metadata: dict[str, Any] = {}
    if metadata_path is not None and metadata_path.is_file():
        metadata = json.loads(metadata_path.read_text())
    return metadata, files


def run(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout) as client:
        if args.command == "import":
            metadata, files = collect(args.path, args.metadata)
            if args.runtime:
                metadata["runtime"] = args.runtime
            if args.example:
                metadata["example"] = json.loads(args.example)
            parts = [
                ("metadata", (METADATA_FILE, json.dumps(metadata).encode(), "application/json"))
            ]
            parts += [
                ("file", (name, data, "application/octet-stream")) for name, data in files.items()
            ]
            response = client.post(
                f"/v1/models/{args.name}/versions",
                files=parts,
                params={"activate": str(not args.no_activate).lower()},
            )
        else:
            target = f"/v1/models/{args.name}"
            if args.version:
                target += f"/versions/{args.version}"
            response = client.delete(target)
    try:
        body: dict[str, Any] = response.json()
    except ValueError:
        body = {"error": response.text}
    if response.is_error:
        raise SystemExit(f"hueyserve: {response.status_code}: {body.get('error', body)}")
    return body


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        body = run(args)
    except httpx.HTTPError as exc:
        raise SystemExit(f"hueyserve: cannot reach {args.url}: {exc}") from None
    json.dump(body, sys.stdout, indent=2)
    sys.stdout.write("\n")
