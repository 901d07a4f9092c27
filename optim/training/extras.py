"""What optim adds to spaCy's training loop (`optim.training.loop`, spaCy 3.8's own functions):
each piece is called at a step marked `# optim:` there.

* `LoopExtras.start`: the optimizer bound to the pipeline (`bind_optimizer`), so
  `[training.optimizer.groups.*]` match parameter paths such as `tagger/softmax/W`; on a
  resume, the loop's counters (`LoopState`) and the optimizer's state loaded, then bound
  again.
* `LoopExtras.replay`: a resumed run draws the data stream again (the corpus, the
  per-epoch shuffles, the batcher and its size schedule, the dropout schedule) for the
  steps already taken, without training, then restores every rank's random generators.
* `LoopExtras.at_boundary`: at a step boundary (every `checkpoint_every` steps, or when
  `stop` says so) the state that decides the rest of the run is written through
  `optim.checkpoint.Checkpoints`: the raw weights, the optimizer, the counters, the
  scores so far and the losses since the last evaluation, every rank's generators, and
  Python's `random` state at the start of each epoch (the data order).
* `replace_dir`: `model-last` and `model-best` replaced atomically (`repair_dirs` puts
  back what a kill between two renames left).
* With `nonfinite = "skip"`, one warning line at the first skipped update (naming its
  parameter) and, after each evaluation row, the number of updates skipped since the
  previous row (`warn_first_skip`, `skipped_row_line`: `optim.training.bind` says the same
  under plain `spacy train`); a `NonFiniteError` ends the run as `Diverged`.
* Ranks of a torchrun group agree on a stop (`any_rank`) and gather sharded averages
  only at a step boundary (`LoopExtras.averages_at_hand`).
"""
import os
import shutil
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Tuple

import srsly
from spacy.training.loop import DIR_MODEL_BEST, DIR_MODEL_LAST

from ..checkpoint import (
    FORMAT_VERSION,
    load_optimizer_state,
    named_optimizer_state,
    param_names,
    param_shapes,
    rng_state,
    set_rng_state,
)

STATE_FORMAT = "optim.spacy_train"


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
    """The loop's own counters: what, besides weights and optimizer, decides the rest.
    `train_while_improving` keeps spaCy's locals (results, losses, words_seen) and copies
    them here at each step's end (`end_step`)."""

    __slots__ = ("step", "epoch", "results", "losses", "words_seen", "seconds",
                 "epoch_states", "finished", "skipped_at_row", "in_step")

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
        self.in_step = True  # False at a step boundary that every rank reached (not saved)

    def end_step(self, step: int, epoch: int, losses: Dict[str, float], words_seen: int,
                 seconds: float) -> None:
        """Step `step` is done: the counters a checkpoint at this boundary saves."""
        self.step, self.epoch = step + 1, epoch
        self.losses, self.words_seen, self.seconds = losses, words_seen, seconds
        self.in_step = False

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


class LoopExtras:
    """optim's steps in spaCy's loop, for one run on this rank: `checkpoints` (an
    `optim.checkpoint.Checkpoints` on every rank, writing on rank 0; None for none)
    every `checkpoint_every` steps and when `stop()` says so on any rank of `group`."""

    def __init__(self, nlp: Any, optimizer: Any, *, group: Any, checkpoints: Any,
                 checkpoint_every: int, stop: Callable[[], bool],
                 config_text: Optional[str], stdout: IO) -> None:
        self.nlp, self.optimizer, self.group = nlp, optimizer, group
        self.checkpoints, self.checkpoint_every, self.stop = checkpoints, checkpoint_every, stop
        self.config_text, self.stdout = config_text, stdout
        self.names, self.shapes = param_names(nlp), param_shapes(nlp)  # the architecture stays put
        self.state = LoopState()
        self.skip_mode = self.warned_skip = False

    def start(self, resume: Optional[Dict[str, Any]], allow_config_change: bool) -> None:
        """Bind the optimizer (a group that matches nothing: GroupsError) and, with
        `resume` (from `optim.spacy_train.load_resume`), load the counters and the
        optimizer's state."""
        bind_optimizer(self.optimizer, self.nlp)
        if resume is not None:
            self.state = LoopState.from_dict(resume["loop"], resume["epoch_states"])
            load_optimizer_state(self.optimizer, resume["optimizer"], self.names,
                                 allow_group_change=allow_config_change)
            bind_optimizer(self.optimizer, self.nlp)  # the loaded state replaced groups and paths
        self.skip_mode = getattr(self.optimizer, "nonfinite", "apply") == "skip"
        self.warned_skip = self.skip_mode and self.optimizer.skipped_total > 0  # before a resume

    def replay(self, train_data: Iterator[Tuple[int, Any]], dropout: Any,
               resume: Optional[Dict[str, Any]]) -> Tuple[Iterator[Tuple[int, Any]], Any]:
        """The batches and the dropout schedule (a float: `constant`) past the steps
        already taken, drawn without training; then the generators as they were."""
        from thinc.api import constant

        dropouts = constant(dropout) if isinstance(dropout, float) else dropout
        for _ in range(self.state.step):  # the data order and schedules of those steps
            next(train_data)
            next(dropouts)
        if resume is not None and resume.get("rng") is not None:
            set_rng_state(resume["rng"])
        return train_data, dropouts

    def after_update(self, step: int) -> None:
        """Before the step's `step_schedules`: name the first skipped update, as far as
        the host knows now (no device wait)."""
        if self.skip_mode and not self.warned_skip:
            self.warned_skip = warn_first_skip(self.optimizer, self.optimizer.peek_skipped(),
                                               f"step {step}", self.stdout)

    def after_row(self, step: int) -> None:
        """After the evaluation row of `step`: the updates skipped since the last row."""
        if not self.skip_mode:
            return
        skipped = self.optimizer.skipped  # every rank: a collective when sharded, a device sync
        total = sum(skipped.values())
        if not self.warned_skip:  # found by a device or another rank since
            self.warned_skip = warn_first_skip(self.optimizer, skipped,
                                               f"a step before {step}", self.stdout)
        self.stdout.write(skipped_row_line(total, self.state.skipped_at_row))
        self.state.skipped_at_row = total

    def at_boundary(self) -> None:
        """At a step boundary the loop goes on from: a checkpoint every
        `checkpoint_every` steps; a stop asked for on any rank writes one and raises
        Stopped."""
        stopping = any_rank(self.group, self.stop())
        path = None
        if self.checkpoints is not None and (stopping or (
                self.checkpoint_every and self.state.step % self.checkpoint_every == 0)):
            path = self.write_checkpoint()
        if stopping:
            raise Stopped(self.state.step, path)

    def write_checkpoint(self) -> Optional[Path]:
        """Every rank: its generators and epoch starts gathered, the optimizer's state
        (a collective when sharded); rank 0 writes the checkpoint."""
        nlp, state, group = self.nlp, self.state, self.group
        opt_msg = named_optimizer_state(self.optimizer, self.names)
        mine = srsly.msgpack_dumps({"rng": rng_state(), "epoch_states": state.epoch_states})
        ranks = group.all_gather_bytes(mine, "the gathering of a checkpoint")
        path = None
        if self.checkpoints.writer:
            path = self.checkpoints.write(state.step, {
                "state.msgpack": srsly.msgpack_dumps({
                    "format": STATE_FORMAT, "version": FORMAT_VERSION,
                    "loop": state.to_dict(), "optimizer": opt_msg, "ranks": ranks,
                    "params": self.shapes, "world_size": group.world_size}),
                "pipeline.bin": nlp.to_bytes(exclude=["vocab"]),
                "strings.json": srsly.json_dumps(list(nlp.vocab.strings)).encode("utf8"),
                "config.cfg": (self.config_text or nlp.config.to_str()).encode("utf8")})
        group.barrier("the end of a checkpoint")
        return path

    def averages_at_hand(self) -> bool:
        """Whether `model-last` can be saved now: not inside a step of a sharded run
        (after an error there its averages cannot be gathered). At a boundary every rank
        gathers them here (a collective when sharded), rank 0 included."""
        sharded = self.group.world_size > 1 and getattr(self.optimizer, "sharded", False)
        if not self.state.in_step and sharded:
            self.optimizer.averages  # gathered by every rank
        return not (self.state.in_step and sharded)

    def finish(self) -> None:
        """The run ended well: the last checkpoint marks it finished (a rerun with
        --resume does nothing)."""
        self.state.finished = True
        if self.checkpoints is not None:
            self.write_checkpoint()


def any_rank(group: Any, flag: bool) -> bool:
    """Whether any rank asked to stop (every rank gets the same answer)."""
    if group.world_size == 1:
        return bool(flag)
    return group.all_min(0 if flag else 1, "the stop check") == 0


def replace_dir(final: Path, write: Callable[[Path], Any]) -> None:
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
    """Undo what a kill between `replace_dir`'s steps left: a lone `.old` goes back."""
    for name in (DIR_MODEL_LAST, DIR_MODEL_BEST):
        final, old = output_path / name, output_path / (name + ".old")
        tmp = output_path / (name + ".tmp")
        if old.exists() and not final.exists():
            os.rename(old, final)
        for leftover in (old, tmp):
            if leftover.exists():
                shutil.rmtree(leftover)
