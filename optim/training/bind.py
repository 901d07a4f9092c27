"""`[training.before_update] @callbacks = "optim.bind.v1"`: path groups and the
non-finite report under plain `spacy train`.

spaCy's own loop hands a `before_update` callback the pipeline and `{"step", "epoch"}`
before every update, and nothing else: not the optimizer it trains with (one that
`spacy train` resolved from the config, not `nlp`'s). So at its first call this callback
binds to `nlp` every optim optimizer that has groups (or a non-finite mode, so that
reports name parameters by path) and was never bound: the optimizers of this config.
One whose groups match nothing in `nlp` is another run's and is left alone, unless none
binds: then the config's groups are wrong and it raises, naming the group. From then
on it reports skipped updates (`nonfinite = "skip"`) as `python -m optim.spacy_train`
does: one warning line at the first, and after each evaluation row the number since the
previous one; at exit, the total. It then calls the user's own callback, if given
(`[training.before_update.callback]`).
"""
import atexit
import sys
from typing import IO, Any, Callable, Dict, List, Optional

from ..settings.per_tensor import live_optimizers
from .loop import skipped_row_line, warn_first_skip

CallbackT = Callable[[Any, Dict[str, Any]], Any]


def bind(callback: Optional[CallbackT] = None) -> "BindCallback":
    """The `optim.bind.v1` callback, wrapping `callback` (the user's before_update)."""
    if callback is not None and not callable(callback):
        raise TypeError(f"optim.bind.v1: callback must be a before_update callback "
                        f"(callable as callback(nlp, args)), got {type(callback).__name__}")
    return BindCallback(callback)


class BindCallback:
    """Binds at the first call, then reports skips and calls the wrapped callback."""

    def __init__(self, callback: Optional[CallbackT], stdout: Optional[IO] = None) -> None:
        self.callback = callback
        self.stdout = sys.stdout if stdout is None else stdout
        self.watched: List[Any] = []  # optim optimizers alive at the first call
        self.eval_frequency = 0
        self.warned = False
        self.at_row = 0  # skipped_total at the last reported row
        self.started = False

    def __call__(self, nlp: Any, args: Dict[str, Any]) -> None:
        step = int(args.get("step", 0))
        if not self.started:
            self.start(nlp)
        elif self.watched:
            self.report(step - 1)
        if self.callback is not None:
            self.callback(nlp, args)

    def start(self, nlp: Any) -> None:
        """Bind the unbound optimizers with groups; note what there is to report."""
        self.started = True
        bound, refused = [], []
        for opt in live_optimizers():  # with groups; in skip or raise mode, for names
            if (opt.groups or opt.nonfinite != "apply") and not opt.paths:
                try:
                    opt.bind(nlp)
                    bound.append(opt)
                except ValueError as err:
                    refused.append(err)
        if refused and not bound:
            raise ValueError(f"optim.bind.v1: [training.optimizer.groups]: {refused[0]}")
        self.watched = [opt for opt in live_optimizers() if opt.nonfinite == "skip"]
        self.at_row = sum(opt.skipped_total for opt in self.watched)
        self.warned = self.at_row > 0
        training = getattr(nlp, "config", {}).get("training", {})
        self.eval_frequency = int(training.get("eval_frequency", 0) or 0)
        if self.watched:
            atexit.register(self.report_total)

    def report(self, step: int) -> None:
        """After step `step`: the first skip, and the count after an evaluation row."""
        if not self.warned:
            for opt in self.watched:  # what the host knows now: no device wait
                if warn_first_skip(opt, opt.peek_skipped(), f"step {step}", self.stdout):
                    self.warned = True
                    break
        if self.eval_frequency and step % self.eval_frequency == 0:
            total = sum(opt.skipped_total for opt in self.watched)
            if not self.warned:  # found by a device since
                for opt in self.watched:
                    if warn_first_skip(opt, opt.skipped, f"a step before {step}",
                                       self.stdout):
                        self.warned = True
                        break
            self.stdout.write(skipped_row_line(total, self.at_row))
            self.at_row = total

    def report_total(self) -> None:
        total = sum(opt.skipped_total for opt in self.watched)
        self.stdout.write(f"optim: updates skipped (non-finite gradients): {total} in all\n")
        self.stdout.flush()
