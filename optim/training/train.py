"""`spacy train` that survives being killed, on one process or every rank of `torchrun`.

    python -m optim.spacy_train config.cfg --output DIR --checkpoint-every 200 [--resume]
    torchrun --nproc_per_node 2 -m optim.spacy_train config.cfg --output DIR [...]

The loop is spaCy's (`optim.training.loop`, the same numbers as `spacy train`). With
`--checkpoint-every N` it writes `DIR/checkpoints/step-<N>.ckpt` (`step-00000200.ckpt`) every N steps, on SIGTERM or
SIGINT (at the next step boundary, then it exits with 128 + the signal's number), and at
the end; the last two are kept, each written atomically. `--resume` continues from the
newest intact one (a plain start if there is none), and a run killed any number of times
and resumed ends bitwise equal to the run that never stopped.

An optim optimizer is bound to the pipeline before training (`optimizer.bind(nlp)`), so
`[training.optimizer.groups.NAME]` tables match parameter paths such as `tagger/softmax/W`;
a group that matches no parameter is refused (exit status 2). With
`nonfinite = "skip"` the console says when the first update is skipped (naming the
parameter) and how many were skipped after each evaluation row; non-finite gradients that
stop the run (`max_consecutive_skips`, or `nonfinite = "raise"`) end it with exit status 3
after saving `model-last` as it stands (no checkpoint of that step).

Data parallel: each rank joins the group torchrun describes, builds the pipeline from the
config (all of the training corpus, so every rank infers the same labels and shapes),
takes rank 0's initial weights, then trains. The config's optimizer should be an
`optim.distributed.*` one and its training corpus an `optim.sharded_corpus.v1`
(docs/distributed.md). On 2+ ranks `[training.batcher]` is wrapped in
`optim.lockstep_batches.v1` so that all ranks make the same number of steps. Only rank 0
prints, logs and writes DIR. A rank that dies or hangs makes the others stop with an
`optim.distributed.DistributedError` within `--timeout` seconds.
"""
import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

# Settings that may change between a checkpoint and its resume: they decide when the
# run stops or what it prints, not its numbers.
MAY_CHANGE = ("training.logger", "training.max_steps", "training.patience",
              "system.gpu_allocator", "training.gpu_allocator")
BAD_INPUT = 2
NOT_FINITE = 3  # non-finite gradients stopped training (optim.NonFiniteError)


class LaunchError(Exception):
    """Bad input found before training starts: a clear message, exit status 2."""


class ConfigChanged(LaunchError):
    """The config differs from the checkpoint's in settings that change the numbers."""


def parse_args(argv: Optional[List[str]]) -> Any:
    parser = argparse.ArgumentParser(
        prog="python -m optim.spacy_train",
        description="spaCy's training loop with checkpoints and an exact resume, on one "
                    "process or on every rank of a torch.distributed group (torchrun).",
        epilog="Further --section.key value arguments override the config, as in spacy train.",
    )
    parser.add_argument("config", help="the training config (.cfg)")
    parser.add_argument("--output", "-o", default=None, help="where rank 0 saves the pipeline")
    parser.add_argument("--code", "-c", default=None,
                        help="a Python file to import first (registered functions)")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                        help="write a checkpoint under OUTPUT/checkpoints every N optimizer "
                             "steps (and on SIGTERM/SIGINT, and at the end)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest intact checkpoint in OUTPUT (a plain "
                             "start if there is none)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even if the config differs from the checkpoint's in "
                             "settings that change the numbers")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds a rank waits for the others (default 300)")
    parser.add_argument("--gpu", action="store_true",
                        help="train on the GPU numbered LOCAL_RANK (CuPy + NCCL; unverified)")
    args, rest = parser.parse_known_args(argv)
    if (args.resume or args.checkpoint_every) and args.output is None:
        parser.error("--resume and --checkpoint-every need --output")
    if args.checkpoint_every < 0:
        parser.error(f"--checkpoint-every must be 1 or more, got {args.checkpoint_every}")
    return args, rest


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


def config_differences(saved: Any, current: Any) -> List[str]:
    """The settings (dotted paths, interpolated values) in which two configs differ,
    leaving out MAY_CHANGE."""
    saved, current = saved.interpolate(), current.interpolate()
    flat_saved, flat_now = _flatten(saved), _flatten(current)
    out = []
    # the first group that matches decides: the order of the groups' tables is a setting
    order_saved, order_now = _group_order(saved), _group_order(current)
    if order_saved != order_now and sorted(order_saved) == sorted(order_now):
        out.append(f"the order of training.optimizer.groups (checkpoint: "
                   f"{', '.join(order_saved)}; now: {', '.join(order_now)})")
    for key in sorted(set(flat_saved) | set(flat_now)):
        if any(key == p or key.startswith(p + ".") for p in MAY_CHANGE):
            continue
        a, b = flat_saved.get(key, "<unset>"), flat_now.get(key, "<unset>")
        if a != b:
            out.append(f"{key} (checkpoint: {a!r}, now: {b!r})")
    return out


def _group_order(config: Any) -> List[str]:
    groups = config.get("training", {}).get("optimizer", {}).get("groups")
    return [str(name) for name in groups] if isinstance(groups, dict) else []


def _flatten(section: Any, prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_resume(files: Dict[str, bytes], path: Path, nlp: Any, group: Any,
                say: Any) -> Dict[str, Any]:
    """Check a checkpoint against the rebuilt pipeline, load its weights into `nlp`, and
    return what `loop.train` needs to continue (this rank's generators, where the
    world size is the checkpoint's)."""
    import srsly

    from ..checkpoint import CheckpointError, check_same_model, check_version
    from .loop import STATE_FORMAT

    state = srsly.msgpack_loads(files["state.msgpack"])
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not an optim.spacy_train checkpoint")
    check_version(state.get("version"), str(path))
    check_same_model(state["params"], nlp, str(path))
    # "config", not "config.cfg": spaCy matches the part before the dot, and the
    # checkpoint's config must not replace this run's (--allow-config-change)
    nlp.from_bytes(files["pipeline.bin"], exclude=["vocab", "config"])
    for text in srsly.json_loads(files["strings.json"].decode("utf8")):
        nlp.vocab.strings.add(text)
    resume = {"path": path, "loop": state["loop"], "optimizer": state["optimizer"],
              "rng": None, "epoch_states": []}
    if int(state["world_size"]) == group.world_size:
        mine = srsly.msgpack_loads(state["ranks"][group.rank])
        resume["rng"], resume["epoch_states"] = mine["rng"], mine["epoch_states"]
    else:
        say(f"the checkpoint was written by {state['world_size']} ranks and this run has "
            f"{group.world_size}: the weights and the optimizer resume exactly, the data "
            "order from here on is that of a run with this world size (docs/integration.md)")
    return resume


def train(config_path: str, output: Optional[str], overrides: dict, *,
          timeout: Optional[float] = None, use_gpu: bool = False, checkpoint_every: int = 0,
          resume: bool = False, allow_config_change: bool = False,
          stop: Any = lambda: False) -> Optional[Path]:
    """Train on this rank; returns where rank 0 saved the pipeline (None elsewhere)."""
    from spacy import util
    from spacy.training.initialize import init_nlp
    from thinc.api import Config

    from . import loop
    from ..checkpoint import Checkpoints, CheckpointError
    from ..distributed import join
    from ..distributed import thinc as _register_optimizers  # noqa: F401
    from ..distributed.training import broadcast_pipeline, unsharded

    group = join(timeout)
    say = (lambda text: print(f"optim.spacy_train: {text}", flush=True))
    gpu_id = -1
    if use_gpu:
        import spacy

        gpu_id = int(os.environ.get("LOCAL_RANK", "0"))
        spacy.require_gpu(gpu_id)
    from spacy.cli._util import show_validation_error

    if config_path != "-" and not Path(config_path).is_file():
        raise LaunchError(f"no config file at {config_path}")
    with show_validation_error(config_path):  # a bad config: spaCy's message, exit 1
        user_config = util.load_config(config_path, overrides=overrides, interpolate=False)
    output_path = Path(output) if output is not None else None
    checkpoints = found = None
    if checkpoint_every or resume:
        checkpoints = Checkpoints(output_path / "checkpoints", writer=group.rank == 0)
        if group.rank == 0:
            checkpoints.check_writable()
        found = checkpoints.newest(warn=say)
        if found is not None and not resume:
            raise CheckpointError(
                f"{checkpoints.root} holds checkpoints of an earlier run: pass --resume to "
                "continue it, or move them away to start a new run")
        if resume and found is None:
            say(f"no checkpoint in {checkpoints.root}: starting a new run")
    if found is not None:
        differences = config_differences(Config().from_bytes(found[1]["config.cfg"],
                                                             interpolate=False), user_config)
        if differences and not allow_config_change:
            raise ConfigChanged(
                "the config differs from the checkpoint's in settings that change the "
                f"numbers: {'; '.join(differences)}. Resume with the checkpoint's config "
                f"({checkpoints.root / 'config.cfg'}), or pass --allow-config-change to continue "
                "anyway (the run will then differ from an uninterrupted one)")
        for text in differences:
            say(f"continuing with a changed setting: {text}")
    config = prepare_config(user_config.copy(), group.rank, group.world_size)
    with unsharded(), show_validation_error(config_path):
        nlp = init_nlp(config, use_gpu=gpu_id)
    state = None
    if found is not None:
        state = load_resume(found[1], found[0], nlp, group, say)
        if state["loop"]["finished"]:
            say(f"the run in {output_path} already finished at step {state['loop']['step']}; "
                "nothing to do")
            return output_path / loop.DIR_MODEL_LAST if group.rank == 0 else None
        if gpu_id >= 0:
            say("CuPy's random generator is not saved: dropout draws on the GPU differ "
                "after the resume (the weights and the optimizer resume exactly)")
    else:
        broadcast_pipeline(nlp, group)
    rank0_output = output_path if group.rank == 0 else None

    def before_start() -> None:  # the optimizer is bound: from here on DIR is written
        if checkpoints is not None and rank0_output is not None and found is None:
            from ..serialize import write_atomic

            write_atomic(checkpoints.root / "config.cfg", user_config.to_str().encode("utf8"))
        if rank0_output is not None:
            rank0_output.mkdir(parents=True, exist_ok=True)
            loop.repair_dirs(rank0_output)

    loop.train(nlp, rank0_output, group=group, checkpoints=checkpoints,
                     checkpoint_every=checkpoint_every, resume=state, stop=stop,
                     config_text=user_config.to_str(), use_gpu=gpu_id,
                     allow_config_change=allow_config_change, before_start=before_start,
                     stdout=sys.stdout, stderr=sys.stderr)
    return rank0_output / loop.DIR_MODEL_LAST if rank0_output is not None else None


class _StopSignals:
    """SIGTERM/SIGINT ask the loop to stop at the next step boundary; a second one
    stops at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def __call__(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Any:
        previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def main(argv: Optional[List[str]] = None) -> int:
    args, rest = parse_args(argv)
    from spacy.cli._util import import_code, parse_config_overrides

    from ..checkpoint import CheckpointError
    from ..distributed import DistributedError
    from .loop import Diverged, GroupsError, Stopped

    overrides = parse_config_overrides(rest)
    import_code(args.code)
    rank = int(os.environ.get("RANK", "0"))
    quiet = open(os.devnull, "w") if rank != 0 else None
    stop = _StopSignals()
    try:
        with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext(), \
                stop.installed():
            train(args.config, args.output, overrides, timeout=args.timeout,
                  use_gpu=args.gpu, checkpoint_every=args.checkpoint_every,
                  resume=args.resume, allow_config_change=args.allow_config_change,
                  stop=stop)
    except Stopped as err:
        if rank == 0:
            where = (f"checkpoint written to {err.path}; rerun with --resume to continue"
                     if err.path is not None else "no checkpoint (no --checkpoint-every)")
            print(f"optim.spacy_train: stopped by {signal.Signals(stop.signum).name} after "
                  f"step {err.step}: {where}", file=sys.stderr)
        return 128 + int(stop.signum)
    except (LaunchError, CheckpointError, GroupsError) as err:
        print(f"optim.spacy_train: {err}", file=sys.stderr)
        return BAD_INPUT
    except Diverged as err:
        if rank == 0:
            where = ""
            if args.checkpoint_every:
                where = (" No checkpoint was written for this step; the earlier ones "
                         "are kept (to go on from the newest with other settings, say a "
                         "lower learning rate: --resume --allow-config-change).")
            print(f"optim.spacy_train: {err}{where}", file=sys.stderr)
        return NOT_FINITE
    except DistributedError as err:
        print(f"optim.spacy_train: rank {rank}: {err}", file=sys.stderr)
        return 1
    finally:
        if quiet is not None:
            quiet.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
