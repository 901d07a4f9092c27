"""`spacy optim-train`: `python -m optim.spacy_train` as a spaCy CLI command.

spaCy imports the modules of the entry point group `spacy_cli` before it parses a command
line (`registry.cli.get_all()` in `spacy.cli._util.setup_cli`); this one adds a command to
spaCy's typer app. Its arguments go to `optim.spacy_train` unparsed, so `--help` and the
`--section.key value` overrides work as there. It stays cheap to import: spaCy imports
it for every `spacy` command.
"""
import typer
from spacy.cli import app


@app.command("optim-train", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             help="spaCy's training loop with checkpoints and an exact resume "
                  "(python -m optim.spacy_train; --help for its options).")
def optim_train(ctx: typer.Context) -> None:
    from .train import main

    raise SystemExit(main(list(ctx.args)))
