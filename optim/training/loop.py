"""spaCy's training loop, mirrored from spaCy 3.8 (`spacy/training/loop.py`, checked
against 3.8.18), with checkpoints at step boundaries and an exact resume.

`train`, `train_while_improving` and `create_train_batches` are copies of spaCy's
functions of the same names, in spaCy's order, with spaCy's text line for line; what
optim adds is a marked step (a line or block commented `# optim:`) that calls a small
named helper of `optim.training.extras`, plus extra arguments: `train`'s checkpoint
and resume settings, `train_while_improving`'s `extras` (a `LoopExtras`) and
`create_train_batches`'s `epoch_states`. `train_while_improving` is a generator yielding
spaCy's `(batch, info, is_best_checkpoint)`; `train` is the thin consumer that saves and
logs. The rest of `spacy.training.loop` (`subdivide_batch`, `create_evaluation_callback`,
`update_meta`, `create_before_to_disk_callback`, `clean_output_dir`) is used as it is,
imported. So an uninterrupted run gives spaCy's numbers bit for bit
(tests/integration_spacy/test_spacy_resume.py compares the files with `python -m spacy train`'s).

To compare with the installed spaCy, function by function:

    python -m optim.training.loop    # a unified diff of each function in MIRRORED

tests/integration_spacy/test_spacy_loop_mirror.py pins the SHA-256 of spaCy's source of each of them: when
spaCy changes one, it fails and names the function to re-check here.

What optim adds (optim.training.extras): checkpoints of everything that decides the
rest of the run (weights, optimizer, counters, scores, losses, every rank's generators,
the data order); a resume that rebuilds the pipeline, loads the state and replays the
data stream of the steps already taken; atomic `model-last`/`model-best`; the optim
optimizer bound to the pipeline (`[training.optimizer.groups.*]`); the non-finite skip
report and `Diverged`; the ranks of a torchrun group stopping together.
"""
import random
import shutil
import sys
from pathlib import Path
from timeit import default_timer as timer
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Optional,
)

from spacy.errors import Errors
from spacy.schemas import ConfigSchemaTraining
from spacy.training.example import Example
from spacy.training.loop import (  # used as they are
    DIR_MODEL_BEST,
    DIR_MODEL_LAST,
    clean_output_dir,
    create_before_to_disk_callback,
    create_evaluation_callback,
    subdivide_batch,
    update_meta,
)
from spacy.util import registry, resolve_dot_names
from thinc.api import Optimizer, constant, fix_random_seed, set_gpu_allocator
from wasabi import Printer

from ..checkpoint import python_random_state, set_python_random_state
from ..settings.per_tensor import NonFiniteError
from .extras import (  # noqa: F401 (public here: optim.training.bind, spacy_train)
    STATE_FORMAT,
    Diverged,
    GroupsError,
    LoopExtras,
    LoopState,
    Stopped,
    bind_optimizer,
    repair_dirs,
    replace_dir,
    skipped_row_line,
    warn_first_skip,
)

if TYPE_CHECKING:
    from spacy.language import Language  # noqa: F401

MIRRORED = ("train", "train_while_improving", "create_train_batches")


def train(
    nlp: "Language",
    output_path: Optional[Path] = None,
    *,
    use_gpu: int = -1,
    stdout: IO = sys.stdout,
    stderr: IO = sys.stderr,
    # optim: what LoopExtras needs, and the resumed run
    group: Any,
    checkpoints: Any = None,
    checkpoint_every: int = 0,
    resume: Optional[Dict[str, Any]] = None,
    stop: Callable[[], bool] = lambda: False,
    config_text: Optional[str] = None,
    allow_config_change: bool = False,
    before_start: Optional[Callable[[], None]] = None,
) -> LoopState:
    """Train a pipeline.

    nlp (Language): The initialized nlp object with the full config.
    output_path (Optional[Path]): Optional output path to save trained model to.
    use_gpu (int): Whether to train on GPU. Make sure to call require_gpu
        before calling this function.
    stdout (file): A file-like object to write output messages. To disable
        printing, set to io.StringIO.
    stderr (file): A second file-like object to write output messages. To disable
        printing, set to io.StringIO.

    optim: `group` (the ranks), `checkpoints` (an `optim.checkpoint.Checkpoints` on
    every rank, writing on rank 0; None for none) every `checkpoint_every` steps and
    when `stop()` says so, `resume` (from `optim.spacy_train.load_resume`) to continue a
    checkpointed run, `config_text` (saved in checkpoints), `allow_config_change` (a
    resumed optimizer's groups may differ), `before_start` (runs once the optimizer is
    bound and resumed, before anything is written).

    RETURNS (LoopState): optim: the loop's counters at the end (spaCy returns the nlp
        object and the path to the exported model).
    """
    # We use no_print here so we can respect the stdout/stderr options.
    msg = Printer(no_print=True)
    # Create iterator, which yields out info after each optimization step.
    config = nlp.config.interpolate()
    if config["training"]["seed"] is not None:
        fix_random_seed(config["training"]["seed"])
    allocator = config["training"]["gpu_allocator"]
    if use_gpu >= 0 and allocator:
        set_gpu_allocator(allocator)
    T = registry.resolve(config["training"], schema=ConfigSchemaTraining)  # type: ignore[arg-type]
    dot_names = [T["train_corpus"], T["dev_corpus"]]
    train_corpus, dev_corpus = resolve_dot_names(config, dot_names)
    optimizer = T["optimizer"]
    score_weights = T["score_weights"]
    batcher = T["batcher"]
    train_logger = T["logger"]
    before_to_disk = create_before_to_disk_callback(T["before_to_disk"])
    before_update = T["before_update"]

    # Helper function to save checkpoints. This is a closure for convenience,
    # to avoid passing in all the args all the time.
    def save_checkpoint(is_best):
        # optim: each directory written beside its place, then swapped in
        with nlp.use_params(optimizer.averages):
            replace_dir(output_path / DIR_MODEL_LAST,
                        lambda tmp: before_to_disk(nlp).to_disk(tmp))
        if is_best:
            replace_dir(output_path / DIR_MODEL_BEST,
                        lambda tmp: shutil.copytree(output_path / DIR_MODEL_LAST, tmp))

    # Components that shouldn't be updated during training
    frozen_components = T["frozen_components"]
    # Components that should set annotations on update
    annotating_components = T["annotating_components"]
    # optim: bind the optimizer, load a resumed run's state, replay its data stream
    extras = LoopExtras(nlp, optimizer, group=group, checkpoints=checkpoints,
                        checkpoint_every=checkpoint_every, stop=stop,
                        config_text=config_text, stdout=stdout)
    extras.start(resume, allow_config_change)
    if before_start is not None:
        before_start()
    train_data, dropout = extras.replay(
        create_train_batches(nlp, train_corpus, batcher, T["max_epochs"],
                             extras.state.epoch_states),
        T["dropout"], resume)
    # Create iterator, which yields out info after each optimization step.
    training_step_iterator = train_while_improving(
        nlp,
        optimizer,
        train_data,
        create_evaluation_callback(nlp, dev_corpus, score_weights),
        dropout=dropout,
        accumulate_gradient=T["accumulate_gradient"],
        patience=T["patience"],
        max_steps=T["max_steps"],
        eval_frequency=T["eval_frequency"],
        exclude=frozen_components,
        annotating_components=annotating_components,
        before_update=before_update,
        extras=extras,
    )
    if resume is None:  # optim: a resumed run keeps what it saved
        clean_output_dir(output_path)
    else:
        stdout.write(msg.info(f"Resuming at step {extras.state.step} (epoch "
                              f"{extras.state.epoch}) from {resume['path']}") + "\n")
    stdout.write(msg.info(f"Pipeline: {nlp.pipe_names}") + "\n")
    if frozen_components:
        stdout.write(msg.info(f"Frozen components: {frozen_components}") + "\n")
    if annotating_components:
        stdout.write(
            msg.info(f"Set annotations on update for: {annotating_components}") + "\n"
        )
    stdout.write(msg.info(f"Initial learn rate: {optimizer.learn_rate}") + "\n")
    if extras.warned_skip:  # optim: skips reported before a resume
        stdout.write(msg.info(f"Updates skipped so far (non-finite gradients): "
                              f"{optimizer.skipped_total}") + "\n")
    with nlp.select_pipes(disable=frozen_components):
        log_step, finalize_logger = train_logger(nlp, stdout, stderr)
    try:
        for batch, info, is_best_checkpoint in training_step_iterator:
            if is_best_checkpoint is not None:
                with nlp.select_pipes(disable=frozen_components):
                    update_meta(T, nlp, info)
                if output_path is not None:
                    save_checkpoint(is_best_checkpoint)
                    info["output_path"] = str(output_path / DIR_MODEL_LAST)
            log_step(info if is_best_checkpoint is not None else None)
    except Stopped:  # optim: a stop asked for, after its checkpoint
        raise
    except NonFiniteError as e:  # optim: non-finite gradients stopped the run
        diverged = Diverged(extras.state.step, e)
        if output_path is not None:
            stdout.write(msg.warn(f"Stopping at step {diverged.step} (non-finite "
                                  f"gradients) and saving {DIR_MODEL_LAST} as it "
                                  "stands") + "\n")
        raise diverged from e
    except Exception as e:
        if output_path is not None:
            stdout.write(
                msg.warn(
                    f"Aborting and saving the final best model. "
                    f"Encountered exception: {repr(e)}"
                )
                + "\n"
            )
        raise e
    finally:
        finalize_logger()
        # optim: sharded averages are gathered at a step boundary only
        if extras.averages_at_hand() and output_path is not None:
            save_checkpoint(False)
    # This will only run if we did't hit an error
    # optim: spaCy's `nlp.use_params(optimizer.averages)` here is never entered (a no-op)
    extras.finish()  # optim: the last checkpoint marks the run finished
    if output_path is not None:
        stdout.write(
            msg.good("Saved pipeline to output directory", output_path / DIR_MODEL_LAST)
            + "\n"
        )
    return extras.state  # optim


def train_while_improving(
    nlp: "Language",
    optimizer: Optimizer,
    train_data,
    evaluate,
    *,
    dropout: float,
    eval_frequency: int,
    accumulate_gradient: int,
    patience: int,
    max_steps: int,
    exclude: List[str],
    annotating_components: List[str],
    before_update: Optional[Callable[["Language", Dict[str, Any]], None]],
    extras: LoopExtras,  # optim
):
    """Train until an evaluation stops improving. Works as a generator,
    with each iteration yielding a tuple `(batch, info, is_best_checkpoint)`,
    where info is a dict, and is_best_checkpoint is in [True, False, None] --
    None indicating that the iteration was not evaluated as a checkpoint.
    The evaluation is conducted by calling the evaluate callback.

    Positional arguments:
        nlp: The spaCy pipeline to evaluate.
        optimizer: The optimizer callable.
        train_data (Iterable[Batch]): A generator of batches, with the training
            data. Each batch should be a Sized[Tuple[Input, Annot]]. The training
            data iterable needs to take care of iterating over the epochs and
            shuffling.
        evaluate (Callable[[], Tuple[float, Any]]): A callback to perform evaluation.
            The callback should take no arguments and return a tuple
            `(main_score, other_scores)`. The main_score should be a float where
            higher is better. other_scores can be any object.

    Every iteration, the function yields out a tuple with:

    * batch: A list of Example objects.
    * info: A dict with various information about the last update (see below).
    * is_best_checkpoint: A value in None, False, True, indicating whether this
        was the best evaluation so far. You should use this to save the model
        checkpoints during training. If None, evaluation was not conducted on
        that iteration. False means evaluation was conducted, but a previous
        evaluation was better.

    The info dict provides the following information:

        epoch (int): How many passes over the data have been completed.
        step (int): How many steps have been completed.
        score (float): The main score from the last evaluation.
        other_scores: : The other scores from the last evaluation.
        losses: The accumulated losses throughout training.
        checkpoints: A list of previous results, where each result is a
            (score, step, epoch) tuple.

    optim: `extras` (a LoopExtras) holds the counters, a resumed run's so far: the
    first step is `extras.state.step` and `train_data` starts there (LoopExtras.replay).
    """
    if isinstance(dropout, float):
        dropouts = constant(dropout)
    else:
        dropouts = dropout
    state = extras.state  # optim: the counters so far
    results = state.results
    losses: Dict[str, float] = state.losses
    words_seen = state.words_seen
    start_time = timer() - state.seconds
    for step, (epoch, batch) in enumerate(train_data, state.step):
        state.in_step = True  # optim
        if before_update:
            before_update_args = {"step": step, "epoch": epoch}
            before_update(nlp, before_update_args)
        dropout = next(dropouts)  # type: ignore
        for subbatch in subdivide_batch(batch, accumulate_gradient):
            nlp.update(
                subbatch,
                drop=dropout,
                losses=losses,
                sgd=False,  # type: ignore[arg-type]
                exclude=exclude,
                annotates=annotating_components,
            )
        # TODO: refactor this so we don't have to run it separately in here
        for name, proc in nlp.pipeline:
            if (
                name not in exclude
                and hasattr(proc, "is_trainable")
                and proc.is_trainable
                and proc.model not in (True, False, None)  # type: ignore[attr-defined]
            ):
                proc.finish_update(optimizer)  # type: ignore[attr-defined]
        extras.after_update(step)  # optim: name the first skipped update
        optimizer.step_schedules()
        if not (step % eval_frequency):
            if optimizer.averages:
                with nlp.use_params(optimizer.averages):
                    score, other_scores = evaluate()
            else:
                score, other_scores = evaluate()
            results.append((score, step))
            is_best_checkpoint = score == max(results)[0]
        else:
            score, other_scores = (None, None)
            is_best_checkpoint = None
        words_seen += sum(len(eg) for eg in batch)
        info = {
            "epoch": epoch,
            "step": step,
            "score": score,
            "other_scores": other_scores,
            "losses": losses,
            "checkpoints": results,
            "seconds": int(timer() - start_time),
            "words": words_seen,
        }
        yield batch, info, is_best_checkpoint
        if is_best_checkpoint is not None:
            losses = {}
            extras.after_row(step)  # optim: the updates skipped since the last row
        state.end_step(step, epoch, losses, words_seen, timer() - start_time)  # optim
        # Stop if no improvement in `patience` updates (if specified)
        # Negate step value so that the earliest best step is chosen for the
        # same score, i.e. (1.0, 100) is chosen over (1.0, 200)
        best_result = max((r_score, -r_step) for r_score, r_step in results)
        best_step = -best_result[1]
        if patience and (step - best_step) >= patience:
            break
        # Stop if we've exhausted our max steps (if specified)
        if max_steps and step >= max_steps:
            break
        extras.at_boundary()  # optim: a checkpoint, or a stop asked for


def create_train_batches(
    nlp: "Language",
    corpus: Callable[["Language"], Iterable[Example]],
    batcher: Callable[[Iterable[Example]], Iterable[Example]],
    max_epochs: int,
    epoch_states: List[Any],  # optim: Python's `random` state at each epoch's start
):
    replay_epochs = len(epoch_states)  # optim: a resumed run's epochs, shuffled again
    epoch = 0
    if max_epochs >= 0:
        examples = list(corpus(nlp))  # type: Iterable[Example]
        if not examples:
            # Raise error if no data
            raise ValueError(Errors.E986)
    while max_epochs < 1 or epoch != max_epochs:
        if epoch < replay_epochs:  # optim: as that epoch did
            set_python_random_state(epoch_states[epoch])
        else:  # optim: recorded for a resume
            epoch_states.append(python_random_state())
        if max_epochs >= 0:
            random.shuffle(examples)  # type: ignore
        else:
            examples = corpus(nlp)
        for batch in batcher(examples):
            yield epoch, batch
        epoch += 1


def diff_against_spacy() -> str:
    """A unified diff of each function in MIRRORED: the installed spaCy's, then this
    module's."""
    import difflib
    import inspect

    from spacy.training import loop

    out: List[str] = []
    for name in MIRRORED:
        theirs = inspect.getsource(getattr(loop, name)).splitlines(keepends=True)
        ours = inspect.getsource(globals()[name]).splitlines(keepends=True)
        out += difflib.unified_diff(theirs, ours, f"spacy.training.loop.{name}",
                                    f"optim.training.loop.{name}")
    return "".join(out)


if __name__ == "__main__":
    sys.stdout.write(diff_against_spacy())
