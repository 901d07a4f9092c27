"""spaCy's training loop (`spacy.training.loop.train` of spaCy 3.8), step for step, with
checkpoints at step boundaries and an exact resume.

The loop below does what `train` and `train_while_improving` do, in the same order, so an
uninterrupted run gives spaCy's numbers bit for bit. What it adds:

* at a step boundary (every `checkpoint_every` steps, or when `stop` says so) the state
  that decides the rest of the run is written through `Checkpoints`: the raw weights, the
  optimizer, the counters (step, epoch, words seen), the scores so far and the losses
  since the last evaluation, every rank's random generators, and Python's `random` state
  at the start of each epoch (the data order);
* a resumed run rebuilds the pipeline and the resolved `[training]` block exactly as a
  fresh one, loads the weights and the optimizer, then replays the data stream (the
  corpus, the per-epoch shuffles, the batcher and its size schedule, the dropout
  schedule) for the steps already taken, without training, and restores the generators:
  every object that a generator holds ends where it was;
* `model-last` and `model-best` are replaced atomically (`save_pipeline`);
* an optim optimizer is bound to the pipeline (`bind_optimizer`) before training and again
  after a resume loads its state, so `[training.optimizer.groups.*]` match parameter paths
  such as `tagger/softmax/W`;
* with `nonfinite = "skip"`, one warning line at the first skipped update (naming its
  parameter) and, after each evaluation row, the number of updates skipped since the
  previous row; a `NonFiniteError` (the `max_consecutive_skips` limit, or
  `nonfinite = "raise"`) ends the run as `Diverged`.
"""
import os
import random
import shutil
import sys
from pathlib import Path
from timeit import default_timer as timer
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Tuple

import srsly

from .checkpoint import (
    FORMAT_VERSION,
    load_optimizer_state,
    named_optimizer_state,
    param_names,
    param_shapes,
    python_random_state,
    rng_state,
    set_python_random_state,
    set_rng_state,
)
from .per_tensor import NonFiniteError

STATE_FORMAT = "optim.spacy_train"
DIR_MODEL_BEST = "model-best"
DIR_MODEL_LAST = "model-last"


class Stopped(Exception):
    """Raised at a step boundary after a stop was asked for and the checkpoint written."""

    def __init__(self, step: int, path: Optional[Path]) -> None:
        super().__init__(f"stopped after step {step}")
        self.step = step
        self.path = path


class GroupsError(Exception):
    """The optimizer's groups do not fit the pipeline (a group matches no parameter)."""


class Diverged(Exception):
    """A `NonFiniteError` stopped training at `step` (`max_consecutive_skips` steps in a
    row skipped an update, or a non-finite gradient with nonfinite="raise")."""

    def __init__(self, step: int, error: Exception) -> None:
        super().__init__(f"stopped at step {step}: {error}")
        self.step = step
        self.error = error


def bind_optimizer(optimizer: Any, nlp: Any) -> bool:
    """Name `nlp`'s parameters for the optimizer's groups (`optimizer.bind(nlp)`: paths
    `<component>/<node name>/<param>`) if it is an optim optimizer, wrapped or not;
    False for one that cannot bind (Thinc's own). GroupsError for a group that matches
    no parameter."""
    bind = getattr(optimizer, "bind", None)
    if not callable(bind):
        return False
    try:
        bind(nlp)
    except ValueError as err:
        raise GroupsError(f"[training.optimizer.groups]: {err}") from None
    return True


def warn_first_skip(optimizer: Any, skipped: Dict[Any, int], when: str, stdout: IO) -> bool:
    """One warning line naming the first skipped parameter; whether one was written."""
    if not skipped:
        return False
    path = optimizer.path_of(next(iter(skipped)))
    stdout.write(f"  warning: {when} skipped an update of {path}: its gradient is not "
                 "finite (nonfinite = \"skip\"; skips are counted after each evaluation "
                 "row)\n")
    return True


def skipped_row_line(total: int, at_last_row: int) -> str:
    """The line after an evaluation row: updates skipped since the previous row."""
    return f"  updates skipped since the last row: {total - at_last_row} ({total} in all)\n"


class LoopState:
    """The loop's own counters: what, besides weights and optimizer, decides the rest."""

    __slots__ = ("step", "epoch", "results", "losses", "words_seen", "seconds",
                 "epoch_states", "finished", "skipped_at_row")

    def __init__(self) -> None:
        self.step = 0                 # steps completed
        self.epoch = 0
        self.results: List[Tuple[float, int]] = []
        self.losses: Dict[str, float] = {}
        self.words_seen = 0
        self.seconds = 0.0
        self.epoch_states: List[Any] = []  # Python `random` state at each epoch's start
        self.finished = False
        self.skipped_at_row = 0  # the optimizer's skipped_total at the last printed row

    def to_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch,
                "results": [[float(s), int(t)] for s, t in self.results],
                "losses": dict(self.losses), "words_seen": self.words_seen,
                "seconds": self.seconds, "finished": self.finished,
                "skipped_at_row": self.skipped_at_row}

    @classmethod
    def from_dict(cls, msg: Dict[str, Any], epoch_states: List[Any]) -> "LoopState":
        state = cls()
        state.step, state.epoch = int(msg["step"]), int(msg["epoch"])
        state.results = [(float(s), int(t)) for s, t in msg["results"]]
        state.losses = dict(msg["losses"])
        state.words_seen, state.seconds = int(msg["words_seen"]), float(msg["seconds"])
        state.finished = bool(msg["finished"])
        state.skipped_at_row = int(msg.get("skipped_at_row", 0))  # absent in older checkpoints
        state.epoch_states = list(epoch_states)
        return state


def train(nlp: Any, output_path: Optional[Path], *, group: Any, checkpoints: Any = None,
          checkpoint_every: int = 0, resume: Optional[Dict[str, Any]] = None,
          stop: Callable[[], bool] = lambda: False, config_text: Optional[str] = None,
          use_gpu: int = -1, allow_config_change: bool = False,
          before_start: Optional[Callable[[], None]] = None,
          stdout: IO = sys.stdout, stderr: IO = sys.stderr) -> LoopState:
    """`spacy.training.loop.train(nlp, output_path)` with checkpoints (`checkpoints`, an
    `optim.checkpoint.Checkpoints` on every rank, writing on rank 0; None for none)
    and, with `resume` (from `load_resume`), a continuation of a checkpointed run.
    `before_start` runs once the optimizer is bound and resumed, before anything is
    written (a bad groups table is refused before it)."""
    from spacy.schemas import ConfigSchemaTraining
    from spacy.training.loop import create_before_to_disk_callback, create_evaluation_callback
    from spacy.training.loop import subdivide_batch, update_meta
    from spacy.util import registry, resolve_dot_names
    from thinc.api import constant, fix_random_seed, set_gpu_allocator
    from wasabi import Printer

    msg = Printer(no_print=True)
    config = nlp.config.interpolate()
    if config["training"]["seed"] is not None:
        fix_random_seed(config["training"]["seed"])
    allocator = config["training"]["gpu_allocator"]
    if use_gpu >= 0 and allocator:
        set_gpu_allocator(allocator)
    T = registry.resolve(config["training"], schema=ConfigSchemaTraining)
    train_corpus, dev_corpus = resolve_dot_names(config, [T["train_corpus"], T["dev_corpus"]])
    optimizer = T["optimizer"]
    before_to_disk = create_before_to_disk_callback(T["before_to_disk"])
    before_update = T["before_update"]
    exclude = T["frozen_components"]
    annotating = T["annotating_components"]
    evaluate = create_evaluation_callback(nlp, dev_corpus, T["score_weights"])
    dropout = T["dropout"]
    dropouts = constant(dropout) if isinstance(dropout, float) else dropout
    names, shapes = param_names(nlp), param_shapes(nlp)  # the architecture stays put

    bind_optimizer(optimizer, nlp)  # a group that matches nothing: refused here
    state = LoopState()
    if resume is not None:
        state = LoopState.from_dict(resume["loop"], resume["epoch_states"])
        load_optimizer_state(optimizer, resume["optimizer"], names,
                             allow_group_change=allow_config_change)
        bind_optimizer(optimizer, nlp)  # the loaded state replaced groups and paths
    skip_mode = getattr(optimizer, "nonfinite", "apply") == "skip"
    warned_skip = skip_mode and optimizer.skipped_total > 0  # reported before a resume
    if before_start is not None:
        before_start()
    replaying = state.step
    stream = enumerate(_train_batches(nlp, train_corpus, T["batcher"], T["max_epochs"],
                                      state.epoch_states, replay_epochs=len(state.epoch_states)))
    for _ in range(replaying):  # the data order and schedules of the steps already taken
        next(stream)
        next(dropouts)
    if resume is not None and resume.get("rng") is not None:
        set_rng_state(resume["rng"])

    def save_pipeline(is_best: bool) -> None:
        with nlp.use_params(optimizer.averages):
            _replace_dir(output_path / DIR_MODEL_LAST,
                         lambda tmp: before_to_disk(nlp).to_disk(tmp))
        if is_best:
            _replace_dir(output_path / DIR_MODEL_BEST,
                         lambda tmp: shutil.copytree(output_path / DIR_MODEL_LAST, tmp))

    def write_checkpoint() -> Optional[Path]:
        """Every rank: its generators and epoch starts gathered, the optimizer's state
        (a collective when sharded); rank 0 writes the checkpoint."""
        opt_msg = named_optimizer_state(optimizer, names)
        mine = srsly.msgpack_dumps({"rng": rng_state(), "epoch_states": state.epoch_states})
        ranks = group.all_gather_bytes(mine, "the gathering of a checkpoint")
        path = None
        if checkpoints.writer:
            state.seconds = seconds()
            path = checkpoints.write(state.step, {
                "state.msgpack": srsly.msgpack_dumps({
                    "format": STATE_FORMAT, "version": FORMAT_VERSION,
                    "loop": state.to_dict(), "optimizer": opt_msg, "ranks": ranks,
                    "params": shapes, "world_size": group.world_size}),
                "pipeline.bin": nlp.to_bytes(exclude=["vocab"]),
                "strings.json": srsly.json_dumps(list(nlp.vocab.strings)).encode("utf8"),
                "config.cfg": (config_text or nlp.config.to_str()).encode("utf8")})
        group.barrier("the end of a checkpoint")
        return path

    start_time = timer() - state.seconds

    def seconds() -> float:
        return timer() - start_time

    if resume is None and output_path is not None:
        from spacy.training.loop import clean_output_dir

        clean_output_dir(output_path)
    if resume is not None:
        stdout.write(msg.info(f"Resuming at step {state.step} (epoch {state.epoch}) from "
                              f"{resume['path']}") + "\n")
    stdout.write(msg.info(f"Pipeline: {nlp.pipe_names}") + "\n")
    if exclude:
        stdout.write(msg.info(f"Frozen components: {exclude}") + "\n")
    if annotating:
        stdout.write(msg.info(f"Set annotations on update for: {annotating}") + "\n")
    stdout.write(msg.info(f"Initial learn rate: {optimizer.learn_rate}") + "\n")
    if warned_skip:
        stdout.write(msg.info(f"Updates skipped so far (non-finite gradients): "
                              f"{optimizer.skipped_total}") + "\n")
    with nlp.select_pipes(disable=exclude):
        log_step, finalize_logger = T["logger"](nlp, stdout, stderr)
    in_step = True  # False at a step boundary that every rank reached
    try:
        for step, (epoch, batch) in stream:
            in_step = True
            if before_update:
                before_update(nlp, {"step": step, "epoch": epoch})
            drop = next(dropouts)
            for subbatch in subdivide_batch(batch, T["accumulate_gradient"]):
                nlp.update(subbatch, drop=drop, losses=state.losses, sgd=False,
                           exclude=exclude, annotates=annotating)
            for name, proc in nlp.pipeline:
                if (name not in exclude and hasattr(proc, "is_trainable")
                        and proc.is_trainable and proc.model not in (True, False, None)):
                    proc.finish_update(optimizer)
            if skip_mode and not warned_skip:  # what the host knows now: no device wait
                warned_skip = warn_first_skip(optimizer, optimizer.peek_skipped(),
                                               f"step {step}", stdout)
            try:
                optimizer.step_schedules()
            except NonFiniteError as err:
                raise Diverged(step, err) from err
            if not (step % T["eval_frequency"]):
                if optimizer.averages:
                    with nlp.use_params(optimizer.averages):
                        score, other_scores = evaluate()
                else:
                    score, other_scores = evaluate()
                state.results.append((score, step))
                is_best = score == max(state.results)[0]
            else:
                score, other_scores, is_best = None, None, None
            state.words_seen += sum(len(eg) for eg in batch)
            info = {"epoch": epoch, "step": step, "score": score,
                    "other_scores": other_scores, "losses": state.losses,
                    "checkpoints": state.results, "seconds": int(seconds()),
                    "words": state.words_seen}
            if is_best is not None:
                with nlp.select_pipes(disable=exclude):
                    update_meta(T, nlp, info)
                if output_path is not None:
                    save_pipeline(is_best)
                    info["output_path"] = str(output_path / DIR_MODEL_LAST)
            log_step(info if is_best is not None else None)
            if is_best is not None:
                state.losses = {}
                if skip_mode:  # every rank: a collective when sharded, a device sync
                    skipped = optimizer.skipped
                    total = sum(skipped.values())
                    if not warned_skip:  # found by a device or another rank since
                        warned_skip = warn_first_skip(optimizer, skipped,
                                                       f"a step before {step}", stdout)
                    stdout.write(skipped_row_line(total, state.skipped_at_row))
                    state.skipped_at_row = total
            state.step, state.epoch = step + 1, epoch
            in_step = False
            best_step = -max((s, -t) for s, t in state.results)[1]  # earliest of the best
            if T["patience"] and (step - best_step) >= T["patience"]:
                break
            if T["max_steps"] and step >= T["max_steps"]:
                break
            stopping = _any_rank(group, stop())
            path = None
            if checkpoints is not None and (
                    stopping or (checkpoint_every and state.step % checkpoint_every == 0)):
                path = write_checkpoint()
            if stopping:
                raise Stopped(state.step, path)
    except Stopped:
        raise
    except (Diverged, NonFiniteError) as e:
        if not isinstance(e, Diverged):  # nonfinite="raise": from an update
            e = Diverged(step, e)
        if output_path is not None:
            stdout.write(msg.warn(f"Stopping at step {e.step} (non-finite gradients) and "
                                  f"saving {DIR_MODEL_LAST} as it stands") + "\n")
        raise e from e.error
    except Exception as e:
        if output_path is not None:
            stdout.write(msg.warn(f"Aborting and saving the final best model. "
                                  f"Encountered exception: {repr(e)}") + "\n")
        raise
    finally:
        finalize_logger()
        sharded = group.world_size > 1 and getattr(optimizer, "sharded", False)
        if not in_step and sharded:
            optimizer.averages  # gathered by every rank (a collective when sharded)
        if output_path is not None and not (in_step and sharded):
            save_pipeline(False)  # after an error, sharded averages can't be gathered
    state.finished = True
    if checkpoints is not None:
        write_checkpoint()  # marks the run finished: a rerun with --resume does nothing
    if output_path is not None:
        stdout.write(msg.good("Saved pipeline to output directory",
                              output_path / DIR_MODEL_LAST) + "\n")
    return state


def _any_rank(group: Any, flag: bool) -> bool:
    """Whether any rank asked to stop (every rank gets the same answer)."""
    if group.world_size == 1:
        return bool(flag)
    return group.all_min(0 if flag else 1, "the stop check") == 0


def _train_batches(nlp: Any, corpus: Callable, batcher: Callable, max_epochs: int,
                   epoch_states: List[Any], replay_epochs: int) -> Iterator[Tuple[int, Any]]:
    """`spacy.training.loop.create_train_batches`, recording Python's `random` state at
    each epoch's start (restored instead for the first `replay_epochs` epochs)."""
    epoch = 0
    if max_epochs >= 0:
        examples = list(corpus(nlp))
        if not examples:
            from spacy.errors import Errors

            raise ValueError(Errors.E986)
    while max_epochs < 1 or epoch != max_epochs:
        if epoch < replay_epochs:
            set_python_random_state(epoch_states[epoch])
        else:
            epoch_states.append(python_random_state())
        if max_epochs >= 0:
            random.shuffle(examples)
        else:
            examples = corpus(nlp)
        for batch in batcher(examples):
            yield epoch, batch
        epoch += 1


def _replace_dir(final: Path, write: Callable[[Path], Any]) -> None:
    """Write a directory beside `final`, then swap it in: at any instant either the old
    or the new one is at `final`, or (between two renames) at `final.old`, which
    `repair_dirs` puts back."""
    tmp = final.with_name(final.name + ".tmp")
    old = final.with_name(final.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def repair_dirs(output_path: Path) -> None:
    """Undo what a kill between `_replace_dir`'s steps left: a lone `.old` goes back."""
    for name in (DIR_MODEL_LAST, DIR_MODEL_BEST):
        final, old = output_path / name, output_path / (name + ".old")
        tmp = output_path / (name + ".tmp")
        if old.exists() and not final.exists():
            os.rename(old, final)
        for leftover in (old, tmp):
            if leftover.exists():
                shutil.rmtree(leftover)


