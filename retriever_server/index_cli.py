"""``ragr1-index``: build a retrieval index folder from a corpus, and cut one into shards."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from retriever_server.builder import BuildError, BuildOptions, build_index
from retriever_server.corpus import CorpusFormatError
from retriever_server.manifest import ManifestError
from retriever_server.sharding import shard_index

logger = logging.getLogger("ragr1-index")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragr1-index", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="embed a corpus and build a dense (faiss) or BM25 index",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    build.add_argument("--corpus", required=True, type=Path,
                       help="Search-R1 jsonl ({id, contents}) or KILT/DPR tsv, optionally .gz")
    build.add_argument("--out", required=True, type=Path, help="index folder to write (resumed if unfinished)")
    build.add_argument("--kind", choices=("dense", "bm25"), default="dense")
    build.add_argument("--encoder", default="minilm",
                       help="model folder or hub name (e.g. intfloat/e5-base-v2, BAAI/bge-large-en-v1.5); "
                            "'minilm' is the offline all-MiniLM-L6-v2")
    build.add_argument("--family", choices=("e5", "bge", "sentence-transformers"), default=None,
                       help="prefix and pooling family (default: guessed from the encoder name)")
    build.add_argument("--pooling", choices=("mean", "cls"), default=None, help="override the family's pooling")
    build.add_argument("--query-prefix", default=None, help="override the family's query prefix")
    build.add_argument("--passage-prefix", default=None, help="override the family's passage prefix")
    build.add_argument("--no-normalize", action="store_true", help="do not L2-normalise embeddings")
    build.add_argument("--max-length", type=int, default=256, help="encoder max tokens per text")
    build.add_argument("--index-type", default="Flat",
                       help="faiss index-factory string: Flat, HNSW32, IVF4096,Flat, IVF4096,PQ64, SQ8, ...")
    build.add_argument("--shard-size", type=int, default=100_000, help="passages per embedding shard")
    build.add_argument("--batch-size", type=int, default=128, help="passages per encoder batch")
    build.add_argument("--device", default="auto", help="encoder device: auto, cpu, cuda, cuda:1, ...")
    build.add_argument("--train-size", type=int, default=200_000, help="vectors used to train IVF/PQ/SQ indexes")
    build.add_argument("--overwrite", action="store_true", help="delete the folder's contents and start over")
    build.add_argument("--num-shards", type=int, default=1,
                       help="also cut the index into N shards: the whole index goes to OUT/full, the shards to OUT")
    shard = commands.add_parser("shard", help="cut a built index into N shards without re-encoding",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    shard.add_argument("--index", required=True, type=Path, help="a finished (unsharded) index folder")
    shard.add_argument("--out", required=True, type=Path, help="the sharded index folder to write")
    shard.add_argument("--num-shards", required=True, type=int, help="contiguous slices of the corpus")
    shard.add_argument("--overwrite", action="store_true", help="replace an index already in --out")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    overrides = {"family": args.family, "pooling": args.pooling, "query_prefix": args.query_prefix,
                 "passage_prefix": args.passage_prefix}
    if args.no_normalize:
        overrides["normalize"] = False
    return {key: value for key, value in overrides.items() if value is not None}


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return build(args) if args.command == "build" else shard(args)
    except (BuildError, CorpusFormatError, ManifestError, FileNotFoundError, ValueError) as err:
        logger.error("%s", err)
        return 2


def shard(args: argparse.Namespace) -> int:
    manifest = shard_index(args.index, args.out, args.num_shards, overwrite=args.overwrite)
    logger.info("cut %d passages into %d shards in %s", manifest.corpus["count"], args.num_shards, args.out)
    return 0


def build(args: argparse.Namespace) -> int:
    if args.num_shards < 1:
        raise ValueError(f"--num-shards must be at least 1, got {args.num_shards}")
    whole = args.out / "full" if args.num_shards > 1 else args.out
    options = BuildOptions(corpus=args.corpus, out_dir=whole, kind=args.kind, encoder=args.encoder,
                           encoder_overrides=_overrides(args), max_length=args.max_length,
                           index_type=args.index_type, shard_size=args.shard_size, batch_size=args.batch_size,
                           device=args.device, train_size=args.train_size, overwrite=args.overwrite)
    manifest = build_index(options)
    logger.info("built a %s index of %d passages in %s", manifest.index["type"], manifest.corpus["count"], whole)
    if args.num_shards > 1:
        shard_index(whole, args.out, args.num_shards, overwrite=args.overwrite)
        logger.info("and %d shards in %s (%s may be deleted once they are served)", args.num_shards, args.out, whole)
    return 0


if __name__ == "__main__":
    sys.exit(main())
