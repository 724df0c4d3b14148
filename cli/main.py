"""The `asif` command line: `asif build`, `asif serve` and `asif eval`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from asif.encoders import IMAGE_ENCODER_HELP, RUNTIME_HELP, RUNTIMES, TEXT_ENCODER_HELP
from asif.encoders.quantize import QUANTIZE_CHOICES
from asif.math.relrep import DEFAULT_K, DEFAULT_P, DEFAULT_PARAMS, WEIGHTINGS
from asif.stores import RERANK_FACTOR
from asif.tuning.autoselect import AUTO_KS, AUTO_SPLITS, AUTO_WEIGHTINGS
from index_builder.sources import SHARD_ROWS

T = TypeVar("T")


def _config(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """A config dataclass from the parsed arguments of the same names, plus overrides."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}  # type: ignore[arg-type]
    return cls(**{**values, **overrides})


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", choices=RUNTIMES, default=None, help=f"where the encoders run: {RUNTIME_HELP}")


def _add_quantize(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default="none",
        help=f"int8: run the image encoder quantised (ONNX Runtime, calibrated on {what}; about 2x faster, but "
        "ASIF's prediction changes on some images, so not the default)",
    )


def _rerank_kind(value: str) -> str | None:
    """``--rerank``: a re-ranking table kind, or None for ``none``."""
    return None if value.lower() == "none" else value


PINS = ("k", "p", "t", "r0", "weighting")  # build options that pin the served default (no --auto by default)


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="embed image-caption pairs and write an index folder",
        description="Embed image-caption pairs once and write an ASIF index folder. "
        "An interrupted build resumes from its embedded chunks when run again with the same arguments.",
    )
    p.add_argument(
        "--pairs",
        required=True,
        help="a CSV/TSV/JSONL pairs file (image,caption), or img2dataset output: webdataset shards or parquet files, "
        "as a brace pattern or glob (quote it: 'data/{00000..00127}.tar', 'data/*.parquet')",
    )
    p.add_argument("--images-root", type=Path, help="folder a pairs file's image paths are relative to")
    p.add_argument("--image-column", help="column of the image (pairs file: image; parquet: jpg, the image bytes)")
    p.add_argument("--caption-column", help="column of the caption (default caption)")
    p.add_argument("--key-column", default="key", help="parquet column of the sample id (default key; else the row)")
    p.add_argument(
        "--shard-rows", type=int, default=SHARD_ROWS, help=f"rows per shard of a pairs file (default {SHARD_ROWS})"
    )
    p.add_argument(
        "--decode-workers",
        type=int,
        default=None,
        help="image decoding processes (default: cores - 1, at most 8; 0 decodes in the main process)",
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="embed the shards with Ray Data on a cluster: auto (the cluster this machine is in), local (start one "
        "here), or ray://head:10001",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="index folder to write (with --store milvus: the folder for the resumable embedding chunks, "
        "default asif-build-<prefix>)",
    )
    p.add_argument(
        "--store",
        choices=("faiss", "milvus"),
        default="faiss",
        help="faiss: an index folder for one process (default); milvus: a shared model that API replicas serve",
    )
    p.add_argument("--milvus-uri", default="milvus.db", help="Milvus server URI (http://host:19530) or a lite file")
    p.add_argument("--milvus-prefix", default="asif", help="collection name prefix of the shared model")
    p.add_argument(
        "--milvus-index", default="FLAT", help="Milvus index type and options, e.g. FLAT or HNSW:M=16,ef=1024"
    )
    p.add_argument("--image-encoder", default="effnet-lite2", help=IMAGE_ENCODER_HELP)
    p.add_argument("--text-encoder", default="minilm", help=TEXT_ENCODER_HELP)
    p.add_argument(
        "--index-type", default="auto", help="auto | flat | ivfpq | a FAISS factory string (auto: flat up to 50k)"
    )
    p.add_argument(
        "--anchors",
        choices=("image", "caption"),
        default="caption",
        help="one anchor per caption (default), or one per image with its captions' mean embedding",
    )
    p.add_argument(
        "--rerank",
        default="Flat",
        help="IVF-PQ re-ranking vectors: Flat (float32) | SQfp16 (float16) | SQ8 / SQ6 / SQ4 (scalar codes) | a FAISS "
        "codec string | none",
    )
    p.add_argument(
        "--rerank-factor",
        type=float,
        default=RERANK_FACTOR,
        help=f"IVF-PQ candidates re-ranked per neighbour kept (default {RERANK_FACTOR:g}; docs/build.md, Index choice)",
    )
    p.add_argument("--k", type=int, default=None, help=f"default k recorded in the manifest (default {DEFAULT_K})")
    p.add_argument(
        "--weighting",
        choices=WEIGHTINGS,
        default=None,
        help="default weighting recorded in the manifest: power (max(s,0)^p, the paper's; default), softmax "
        "(temperature --t) or rank (1/(rank + --r0))",
    )
    p.add_argument("--p", type=float, default=None, help=f"power weighting: default p (default {DEFAULT_P:g})")
    p.add_argument(
        "--t", type=float, default=None, help=f"softmax weighting: temperature (default {DEFAULT_PARAMS['softmax']:g})"
    )
    p.add_argument(
        "--r0", type=float, default=None, help=f"rank weighting: rank offset (default {DEFAULT_PARAMS['rank']:g})"
    )
    p.add_argument(
        "--auto",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="choose the default k and weighting from the pairs being built, without labels, and record them in "
        "the manifest. On by default unless --k, --p, --t, --r0 or --weighting pin them (given --auto, it overrides "
        "them); --no-auto records the paper's k=800, p=8. With fewer than 3 distinct images the default falls back "
        f"to those. Whole images are held out ({AUTO_SPLITS} seeded splits); "
        "each setting scores the held-out images' mean reciprocal rank of their own captions among the held-out "
        f"captions. Grid: k in {{{', '.join(map(str, AUTO_KS))}}} x "
        f"{{{', '.join(w.describe() for w in AUTO_WEIGHTINGS)}}}. Reads the embedded shards three times more",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of --auto's first held-out split and of the index training sample"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    _add_runtime(p)
    _add_quantize(p, "the first 256 distinct images, and kept in the index folder")
    p.add_argument("--force", action="store_true", help="rebuild over an existing index folder or Milvus prefix")
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="exit 0 without building when the target already holds a model (a compose builder that runs again)",
    )


def _run_build(args: argparse.Namespace) -> int:
    from index_builder.build import BuildConfig, run_build
    from index_builder.config import weighting_of
    from index_builder.errors import AlreadyBuiltError, BuildError
    from index_builder.pairs_io import PairsFileError

    try:
        weighting_of(args.weighting or "power", args.p, args.t, args.r0)  # --p/--t/--r0 belong to --weighting's kind
    except (BuildError, ValueError) as exc:
        print(f"asif build: error: {exc}", file=sys.stderr)
        return 2
    if args.out is None:
        if args.store == "faiss":
            print("asif build: error: --out is required (the index folder to write)", file=sys.stderr)
            return 2
        args.out = Path(f"asif-build-{args.milvus_prefix}")
    pinned = any(getattr(args, name) is not None for name in PINS)
    overrides: dict[str, Any] = {
        "rerank": _rerank_kind(args.rerank),
        "auto": args.auto if args.auto is not None else not pinned,
        "auto_fallback": args.auto is None,  # the default's choice: too few images keeps the paper's k and p
    }
    for name in ("decode_workers", *PINS):
        if getattr(args, name) is None:
            delattr(args, name)  # the config's default
    config = _config(BuildConfig, args, **overrides)
    try:
        report = run_build(config)
    except AlreadyBuiltError as exc:
        if args.skip_existing:
            print(f"asif build: {exc}: nothing to do (--skip-existing)")
            return 0
        print(f"asif build: error: {exc}", file=sys.stderr)
        return 2
    except (BuildError, PairsFileError, ValueError) as exc:
        print(f"asif build: error: {exc}", file=sys.stderr)
        return 2
    if args.store == "milvus":
        print(f"shared model {args.milvus_prefix!r} loaded into Milvus at {args.milvus_uri}")
    else:
        print(f"index written to {args.out}")
    print("\n".join(report.lines()))
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve an index folder over HTTP",
        description="Start the REST service. Other settings come from ASIF_* environment variables "
        "(docs/api.md, Configuration).",
    )
    p.add_argument("--index", type=Path, help="index folder written by `asif build` (not with ASIF_STORE=milvus)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1); any other than loopback needs ASIF_API_KEY or --open-writes",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--open-writes",
        action="store_true",
        default=None,
        help="serve a non-loopback --host without ASIF_API_KEY: anyone who can reach the port may add and delete "
        "pairs and label sets (same as ASIF_OPEN_WRITES=1)",
    )
    _add_runtime(p)


LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server to this machine: a loopback address (127.0.0.0/8, ::1) or localhost."""
    import ipaddress

    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name or an interface address: reachable from elsewhere


def open_writes_refusal(host: str, has_key: bool, open_writes: bool) -> str | None:
    """Why `asif serve` must not start: write endpoints open to the network by accident. None when it may."""
    if has_key or open_writes or is_loopback(host):
        return None
    return (
        f"--host {host} is reachable from other machines and ASIF_API_KEY is not set, so anyone could add and "
        "delete pairs and label sets: set ASIF_API_KEY, or pass --open-writes (ASIF_OPEN_WRITES=1) to open writes "
        "on purpose"
    )


def _run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.core.config import Settings
    from app.main import create_app
    from asif.encoders import requested_runtime
    from asif.encoders.quantize import quantization_of
    from asif.state.persist import IndexFolderError, read_manifest

    given = {"index": args.index, "runtime": args.runtime, "open_writes": args.open_writes}
    settings = Settings(**{k: v for k, v in given.items() if v is not None})
    refusal = open_writes_refusal(args.host, settings.api_key is not None, settings.open_writes)
    if refusal is not None:  # before the index and the encoders load: a misconfiguration fails at once
        print(f"asif serve: error: {refusal}", file=sys.stderr)
        return 2
    if settings.store == "faiss":  # the index folder must be there; Milvus mode reads shared state instead
        if args.index is None:
            print("asif serve: error: --index is required (or ASIF_STORE=milvus)", file=sys.stderr)
            return 2
        try:
            manifest = read_manifest(args.index)
        except IndexFolderError as exc:
            print(f"asif serve: error: {exc}", file=sys.stderr)
            return 2
        if quantization_of(manifest.get("image_encoder", {})) and requested_runtime(settings.runtime) == "torch":
            print(
                "asif serve: error: this index's image encoder is int8 (built with --quantize int8), which runs on "
                "ONNX Runtime only: use --runtime onnx or auto",
                file=sys.stderr,
            )
            return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    uvicorn.run(create_app(settings, own_process=True), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="zero-shot evaluation on a labelled image folder",
        description="Evaluate an index (--index) or pairs (--pairs/--images-root) on a test set in ImageFolder "
        "layout. Writes report.json, report.md, accuracy_vs_pairs.png and confusion.png to --out.",
    )
    p.add_argument("--test", type=Path, required=True, help="test set root: <root>/<class>/<image>")
    p.add_argument("--out", type=Path, required=True, help="folder for the report and plots")
    p.add_argument("--index", type=Path, help="an index folder built by `asif build`")
    p.add_argument("--pairs", type=Path, help="pairs file (instead of --index): both anchor modes are compared")
    p.add_argument("--images-root", type=Path)
    p.add_argument("--image-encoder", default="effnet-lite2", help=IMAGE_ENCODER_HELP)
    p.add_argument("--text-encoder", default="minilm", help=TEXT_ENCODER_HELP)
    p.add_argument("--classes", type=Path, help="TSV 'folder<TAB>class name' (default: folder names)")
    p.add_argument("--templates", type=Path, help="prompt templates, one per line with '{}'")
    p.add_argument("--anchors", choices=("image", "caption"), default="caption", help="primary anchor mode")
    p.add_argument("--index-type", default="auto", help="index of the served path with --pairs")
    p.add_argument("--rerank-factor", type=float, default=RERANK_FACTOR, help="IVF-PQ re-ranking factor, with --pairs")
    p.add_argument("--rerank", default="Flat", help="IVF-PQ re-ranking table (Flat, SQfp16, SQ8, ...), with --pairs")
    p.add_argument(
        "--store", choices=("faiss", "milvus"), default="faiss", help="anchor store of the served path, with --pairs"
    )
    p.add_argument("--milvus-uri", default=None, help="with --store milvus (default: a lite file in --out)")
    p.add_argument("--milvus-index", default="FLAT", help="with --store milvus: index type and options")
    p.add_argument("--k", type=int, default=DEFAULT_K)
    p.add_argument("--p", type=float, default=DEFAULT_P)
    p.add_argument("--ks", default="25,50,100,200,400,800,1600", help="k values of the sweep")
    p.add_argument("--ps", default="1,2,3,4,6,8", help="p values of the sweep")
    p.add_argument("--sizes", default="1000,2000,5000,10000,20000", help="pair counts of the curve (plus all)")
    p.add_argument("--threshold", type=float, default=None, help="answer 'unknown' below this score")
    p.add_argument("--auto", action="store_true", help="also pick k and the weighting from the pairs alone")
    p.add_argument(
        "--candidates",
        default="",
        help="training-free variants to compare with the default at --k/--p: all, or a comma list of default, "
        "centre, centre-image, hubness, softmax, rank",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    _add_runtime(p)
    _add_quantize(p, "the first 256 anchor images; with --pairs")


def _candidates(value: str) -> list[str]:
    from evaluation.candidates import NAMES

    names = [v.strip() for v in value.split(",") if v.strip()]
    return list(NAMES) if names == ["all"] else names


def _run_eval(args: argparse.Namespace) -> int:
    from evaluation.config import EvalConfig
    from evaluation.report import markdown
    from evaluation.run import run_eval

    cfg = _config(
        EvalConfig,
        args,
        rerank=_rerank_kind(args.rerank),
        ks=[int(x) for x in args.ks.split(",")],
        ps=[float(x) for x in args.ps.split(",")],
        sizes=[int(x) for x in args.sizes.split(",")],
        candidates=_candidates(args.candidates),
    )
    try:
        report = run_eval(cfg)
    except ValueError as exc:
        print(f"asif eval: error: {exc}", file=sys.stderr)
        return 2
    print(markdown(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="asif", description="ASIF: multimodal models from unimodal encoders")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_build(sub)
    _add_serve(sub)
    _add_eval(sub)
    args = parser.parse_args(argv)
    if args.command == "build":
        return _run_build(args)
    if args.command == "serve":
        return _run_serve(args)
    if args.command == "eval":
        return _run_eval(args)
    parser.error(f"unknown command {args.command}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
