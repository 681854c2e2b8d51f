"""`python -m hueyserve`: submit predictions and trainings and follow them to their end with
a progress bar; import a model from disk into a running deployment, or delete one. It talks
to the API only (its address and a key, not Redis), so it runs on any machine that reaches it.

    python -m hueyserve predict iris '[[5.1, 3.5, 1.4, 0.2]]'
    python -m hueyserve train diabetes --params '{"n_estimators": 300}'
    python -m hueyserve follow 8f14e45f-...                    # a job submitted elsewhere
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
from hueyserve.following import FollowError, follow

DEFAULT_URL = "http://127.0.0.1:8000"


def parser() -> argparse.ArgumentParser:
    summary = " ".join(__doc__.split("\n\n")[0].split())  # the docstring's first paragraph
    top = argparse.ArgumentParser(prog="python -m hueyserve", description=summary)
    top.add_argument(
        "--url", default=os.environ.get("HUEYSERVE_URL", DEFAULT_URL),
        help=f"the API (env HUEYSERVE_URL; default {DEFAULT_URL})",
    )  # fmt: skip
    top.add_argument(
        "--api-key", default=os.environ.get("HUEYSERVE_API_KEY"),
        help="a key, when the API has keys: an admin key to train, import and delete "
        "(env HUEYSERVE_API_KEY)",
    )  # fmt: skip
    top.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (600)")
    top.add_argument("--quiet", action="store_true", help="no progress bar; only the answer")
    commands = top.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="submit a predict job and follow it to its end")
    predict.add_argument("name")
    predict.add_argument("instances", help="input rows as JSON: '[[5.1, 3.5, 1.4, 0.2]]'")
    predict.add_argument("--version", help="default: the active one")
    predict.add_argument("--priority", type=int, help="default: the async default")
    train = commands.add_parser("train", help="submit a training job and follow it to its end")
    train.add_argument("name", help="the model to train a new version of (or a new model)")
    train.add_argument("--estimator", help="default: the active version's")
    train.add_argument("--dataset", help="default: the active version's")
    train.add_argument("--params", help="estimator parameters as JSON: '{\"n_estimators\": 300}'")
    for submitting in (predict, train):
        submitting.add_argument(
            "--no-follow", action="store_true", help="answer with the job id at once"
        )
    watch = commands.add_parser("follow", help="follow a job (by id) to its end")
    watch.add_argument("job_id")
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
        if args.command in ("predict", "train", "follow"):
            return submit_and_follow(client, args)
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
    return answer(response)


def answer(response: httpx.Response) -> dict[str, Any]:
    """The response's JSON; an error exits with its status and message."""
    try:
        body: dict[str, Any] = response.json()
    except ValueError:
        body = {"error": response.text}
    if response.is_error:
        raise SystemExit(f"hueyserve: {response.status_code}: {body.get('error', body)}")
    return body


def submit_and_follow(client: httpx.Client, args: argparse.Namespace) -> dict[str, Any]:
    """Submit the job (predict, train) or take its id (follow); follow it unless told not to."""
    if args.command == "predict":
        body = {"model": args.name, "instances": _json(args.instances, "instances")}
        body |= {k: v for k, v in (("version", args.version), ("priority", args.priority)) if v}
        job_id = answer(client.post("/v1/jobs", json=body))["job_id"]
    elif args.command == "train":
        plan = {"estimator": args.estimator, "dataset": args.dataset}
        plan = {k: v for k, v in plan.items() if v} | (
            {"params": _json(args.params, "params")} if args.params else {}
        )
        job_id = answer(client.post(f"/v1/models/{args.name}/train", json=plan))["job_id"]
    else:
        job_id = args.job_id
    if getattr(args, "no_follow", False):
        return {"job_id": job_id, "location": f"/v1/jobs/{job_id}"}
    try:
        final: dict[str, Any] = follow(client, job_id, timeout_s=args.timeout, quiet=args.quiet)
    except FollowError as exc:
        raise SystemExit(f"hueyserve: {exc}") from None
    if final.get("status") != "done":
        json.dump(final, sys.stdout, indent=2)
        raise SystemExit(f"\nhueyserve: job {job_id} {final.get('status')}: {final.get('error')}")
    return final


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise SystemExit(f"hueyserve: {what} is not JSON: {exc}") from None


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        body = run(args)
    except httpx.HTTPError as exc:
        raise SystemExit(f"hueyserve: cannot reach {args.url}: {exc}") from None
    try:
        json.dump(body, sys.stdout, indent=2)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:  # piped into `head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # none again at exit
