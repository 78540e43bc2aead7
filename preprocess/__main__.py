"""``python -m preprocess <source> ...``: build webdataset shards from a source.

    python -m preprocess emoji   --out data --resolutions 512 32
    python -m preprocess folder  photos/          --out data/mine --resolutions 256
    python -m preprocess jsonl   captions.jsonl   --out data/mine
    python -m preprocess csv     captions.csv     --out data/mine --image-column file
    python -m preprocess parquet pokemon.parquet  --out data/pokemon-{res} --resolutions 512 64
    python -m preprocess wds     img2dataset_out/ --out data/laion
    python -m preprocess subset  data/emoji-32    --out data/overfit-32 --resolutions 32 \
        --words heart circle square --others 500     (the overfit test's subset)

Each subcommand is a thin call into the library: the common options become a BuildConfig,
the source a re-iterable sample stream. With several resolutions ``--out`` must contain
``{res}`` (one dataset folder per resolution); the emoji set writes ``<out>/emoji-<res>``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .build import BuildConfig, DatasetInfo, build_shards
from .emoji import build_emoji
from .report import BuildReport
from .sources import folder_samples, parquet_samples, table_samples, wds_samples
from .subset import SubsetSource


def _common(parser: argparse.ArgumentParser, resolutions: list[int]) -> None:
    parser.add_argument("--out", required=True, help="output folder ({res} per resolution)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=resolutions)
    parser.add_argument("--val-fraction", type=float, default=0.03)
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--format", choices=("png", "jpg", "webp"), default="png")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes (0: none)")


def _own_data(parser: argparse.ArgumentParser) -> None:
    _common(parser, [256])
    parser.add_argument("source", type=Path)
    parser.add_argument("--licence", default="unknown")
    parser.add_argument("--attribution", default="")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m preprocess", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    emoji = sub.add_parser("emoji", help="the bundled OpenMoji + Twemoji set (npm)")
    _common(emoji, [512, 32])
    emoji.add_argument("--cache", type=Path, help="npm tarball cache (default <out>/.cache/npm)")
    emoji.add_argument("--openmoji-tgz", type=Path, help="use this openmoji tarball, no npm")
    emoji.add_argument("--twemoji-tgz", type=Path, help="use this @twemoji/svg tarball, no npm")

    folder = sub.add_parser("folder", help="images with .txt or .json caption sidecars")
    _own_data(folder)
    folder.add_argument("--caption-field", default="caption", help="caption key in .json")

    for fmt in ("jsonl", "csv"):
        table = sub.add_parser(fmt, help=f"a {fmt.upper()} manifest: image path + caption")
        _own_data(table)
        table.add_argument("--image-column", default="image")
        table.add_argument("--caption-column", default="caption")
        table.add_argument("--key-column", default=None)

    parquet = sub.add_parser("parquet", help="Parquet file(s) with image bytes + text")
    _own_data(parquet)
    parquet.add_argument("--image-column", default="image")
    parquet.add_argument("--caption-column", default="text")
    parquet.add_argument("--key-column", default=None)

    wds = sub.add_parser("wds", help="webdataset / img2dataset tar shards (re-shard, resize)")
    _own_data(wds)
    wds.add_argument("--caption-field", default="caption", help="caption key in .json")

    subset = sub.add_parser("subset", help="a shard folder's samples with given words (+ others)")
    _own_data(subset)
    subset.add_argument("--words", nargs="+", required=True, help="keep captions with any")
    subset.add_argument("--others", type=int, default=0, help="about this many other samples")
    subset.add_argument("--seed", type=int, default=0, help="which others")
    return parser


def _samples(args: argparse.Namespace):
    if args.command == "folder":
        return functools.partial(folder_samples, args.source, args.caption_field)
    if args.command in ("jsonl", "csv"):
        return functools.partial(
            table_samples,
            args.source,
            args.command,
            args.image_column,
            args.caption_column,
            args.key_column,
        )
    if args.command == "parquet":
        return functools.partial(
            parquet_samples, args.source, args.image_column, args.caption_column, args.key_column
        )
    if args.command == "subset":
        return SubsetSource(args.source, args.words, args.others, args.seed)
    return functools.partial(wds_samples, args.source, args.caption_field)


def _outputs(out: str, resolutions: Sequence[int]) -> dict[int, Path]:
    if len(resolutions) > 1 and "{res}" not in out:
        raise ValueError(f"--out {out!r} must contain {{res}} with several --resolutions")
    return {r: Path(out.replace("{res}", str(r))) for r in resolutions}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    try:
        config = BuildConfig(
            resolutions=tuple(args.resolutions),
            val_fraction=args.val_fraction,
            shard_size=args.shard_size,
            image_format=args.format,
            workers=args.workers,
        )
        if args.command == "emoji":
            report: BuildReport = build_emoji(
                Path(args.out), config, args.cache, args.openmoji_tgz, args.twemoji_tgz
            )
        else:
            if not args.source.exists():
                raise FileNotFoundError(f"{args.source} does not exist")
            info = DatasetInfo(
                source=f"{args.command}:{args.source}",
                licence=args.licence,
                attribution=args.attribution,
            )
            report = build_shards(
                _samples(args), _outputs(args.out, config.resolutions), config, info
            )
    except (ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.table())
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":  # guarded: worker processes are spawned and re-import this module
    raise SystemExit(main())
