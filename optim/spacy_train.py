"""Data-parallel `spacy train`: run it on every rank, with rank 0 alone writing.

    torchrun --nproc_per_node 2 -m optim.spacy_train config.cfg --output DIR [--paths.train ...]

Each rank joins the group torchrun describes, builds the pipeline from the config (all
of the training corpus, so every rank infers the same labels and shapes), takes rank 0's
initial weights, then runs spaCy's own training loop. The config's optimizer should be
an `optim.distributed.*` one and its training corpus an `optim.sharded_corpus.v1`
(docs/distributed.md). On 2+ ranks `[training.batcher]` is wrapped in
`optim.lockstep_batches.v1` so that all ranks make the same number of steps. Only rank 0
prints, logs and writes DIR; the others print errors only. A rank that dies or hangs
makes the others stop with an `optim.distributed.DistributedError` within `--timeout`
seconds. Without torchrun (or with one process) it is plain `spacy train`.
"""
import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, List, Optional


def parse_args(argv: Optional[List[str]]) -> Any:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node N -m optim.spacy_train",
        description="Run spaCy's training on every rank of a torch.distributed group.",
        epilog="Further --section.key value arguments override the config, as in spacy train.",
    )
    parser.add_argument("config", help="the training config (.cfg)")
    parser.add_argument("--output", "-o", default=None, help="where rank 0 saves the pipeline")
    parser.add_argument("--code", "-c", default=None,
                        help="a Python file to import first (registered functions)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds a rank waits for the others (default 300)")
    parser.add_argument("--gpu", action="store_true",
                        help="train on the GPU numbered LOCAL_RANK (CuPy + NCCL; unverified)")
    return parser.parse_known_args(argv)


def prepare_config(config: Any, rank: int, world_size: int) -> Any:
    """The config each rank trains with: lockstep batches on 2+ ranks, and a plain
    console logger (whose output is discarded) on every rank but 0."""
    if world_size > 1:
        training = config["training"]
        training["batcher"] = {"@batchers": "optim.lockstep_batches.v1",
                               "batcher": training["batcher"]}
        if rank != 0:
            training["logger"] = {"@loggers": "spacy.ConsoleLogger.v1", "progress_bar": False}
    return config


def train(config_path: str, output: Optional[str], overrides: dict, *,
          timeout: Optional[float] = None, use_gpu: bool = False) -> Optional[Path]:
    """Train on this rank; returns where rank 0 saved the pipeline (None elsewhere)."""
    from spacy import util
    from spacy.training.initialize import init_nlp
    from spacy.training.loop import train as train_nlp

    from .distributed import join
    from .distributed import thinc as _register_optimizers  # noqa: F401
    from .distributed.training import broadcast_pipeline, unsharded

    group = join(timeout)
    gpu_id = -1
    if use_gpu:
        import spacy

        gpu_id = int(os.environ.get("LOCAL_RANK", "0"))
        spacy.require_gpu(gpu_id)
    config = util.load_config(config_path, overrides=overrides, interpolate=False)
    config = prepare_config(config, group.rank, group.world_size)
    with unsharded():
        nlp = init_nlp(config, use_gpu=gpu_id)
    broadcast_pipeline(nlp, group)
    output_path = Path(output) if output is not None and group.rank == 0 else None
    if output_path is not None:
        output_path.mkdir(parents=True, exist_ok=True)
    _, saved = train_nlp(nlp, output_path, use_gpu=gpu_id, stdout=sys.stdout,
                         stderr=sys.stderr)
    return saved


def main(argv: Optional[List[str]] = None) -> int:
    args, rest = parse_args(argv)
    from spacy.cli._util import import_code, parse_config_overrides

    from .distributed import DistributedError

    overrides = parse_config_overrides(rest)
    import_code(args.code)
    rank = int(os.environ.get("RANK", "0"))
    quiet = open(os.devnull, "w") if rank != 0 else None
    try:
        with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
            train(args.config, args.output, overrides, timeout=args.timeout,
                  use_gpu=args.gpu)
    except DistributedError as err:
        print(f"optim.spacy_train: rank {rank}: {err}", file=sys.stderr)
        return 1
    finally:
        if quiet is not None:
            quiet.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
