"""`python -m optim.spacy_train`: spaCy training with checkpoints and exact resume
(optim/training/train.py; docs/integration.md, "Resumable training")."""
import sys

from .training.train import main

if __name__ == "__main__":
    sys.exit(main())
