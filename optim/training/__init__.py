"""spaCy training with optim: spaCy 3.8's loop mirrored with checkpoints and an exact
resume (`loop`, `extras`), its command line (`train`: `python -m optim.spacy_train`;
`cli`: `spacy optim-train`), and `optim.bind.v1` for plain `spacy train` (`bind`).
Importing these modules imports spaCy."""
