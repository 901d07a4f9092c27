"""Generated text classification data for the spaCy tests: short texts whose label is
whether they hold more positive than negative words."""
import random

POSITIVE = "good great fine lovely superb nice happy bright warm pleasant".split()
NEGATIVE = "bad awful poor nasty dreadful grim sad dark cold unpleasant".split()
FILLER = "the a film book day meal was is and it very quite rather place story".split()


def texts(n: int, seed: int) -> list:
    """n (text, cats) pairs, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        n_pos, n_neg = rng.randint(0, 3), rng.randint(0, 3)
        if n_pos == n_neg:
            n_pos += 1 if rng.random() < 0.5 else 0
            n_neg += 0 if n_pos > n_neg else 1
        words = (
            [rng.choice(POSITIVE) for _ in range(n_pos)]
            + [rng.choice(NEGATIVE) for _ in range(n_neg)]
            + [rng.choice(FILLER) for _ in range(rng.randint(2, 8))]
        )
        rng.shuffle(words)
        pos = n_pos > n_neg
        out.append((" ".join(words), {"POSITIVE": float(pos), "NEGATIVE": float(not pos)}))
    return out
