#!/usr/bin/env python
"""Train a small Thinc MLP on scikit-learn's bundled digits with optim.Adam and thinc's Adam.

Both runs share the initial weights (thinc.api.fix_random_seed(0)), the batches and the
hyperparameters, so their loss curves should agree to float32 rounding. The script prints,
per epoch and for each library: the mean training loss, the time spent inside the optimizer
(all of `model.finish_update(optimizer)` for the epoch) and the test accuracy, then the final
accuracy with the plain and with the averaged parameters (`model.use_params(opt.averages)`).

    python examples/digits.py [--epochs 10] [--batch-size 32] [--width 64] [--repeats 3]

Needs thinc and scikit-learn (`pip install "thinc-optim[test]"`); no download.
"""
import argparse
import time

import numpy
from sklearn.datasets import load_digits
from thinc.api import Adam as ThincAdam
from thinc.api import Relu, Softmax, chain, fix_random_seed

import optim

HYPER = dict(
    learn_rate=0.003, beta1=0.9, beta2=0.999, eps=1e-8, L2=0.01, grad_clip=1.0,
    L2_is_weight_decay=True, use_averages=True,
)


def load_data(epochs, batch_size, seed=0):
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype("float32")
    rng = numpy.random.RandomState(seed)
    order = rng.permutation(len(X))
    X, y = X[order], y[order]
    n_train = 1400
    Y = numpy.zeros((len(y), 10), dtype="float32")
    Y[numpy.arange(len(y)), y] = 1
    batches = []
    for _ in range(epochs):
        perm = rng.permutation(n_train)
        batches.append([perm[i : i + batch_size] for i in range(0, n_train, batch_size)])
    return X[:n_train], Y[:n_train], X[n_train:], y[n_train:], batches


def accuracy(model, X, y):
    return float((model.predict(X).argmax(axis=1) == y).mean())


def train(optimizer, data, width):
    Xtr, Ytr, Xte, yte, batches = data
    fix_random_seed(0)
    model = chain(Relu(width), Softmax())
    model.initialize(X=Xtr[:5], Y=Ytr[:5])
    curve = []
    for epoch_batches in batches:
        losses = []
        opt_time = 0.0
        for idx in epoch_batches:
            Yh, backprop = model.begin_update(Xtr[idx])
            losses.append(-(Ytr[idx] * numpy.log(Yh + 1e-12)).sum() / len(idx))
            backprop((Yh - Ytr[idx]) / len(idx))
            t0 = time.perf_counter()
            model.finish_update(optimizer)
            optimizer.step_schedules()
            opt_time += time.perf_counter() - t0
        curve.append((float(numpy.mean(losses)), opt_time, accuracy(model, Xte, yte)))
    acc = accuracy(model, Xte, yte)
    with model.use_params(optimizer.averages):
        acc_avg = accuracy(model, Xte, yte)
    return curve, acc, acc_avg


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument(
        "--repeats", type=int, default=3,
        help="train each library this many times and report the fastest optimizer time",
    )
    args = parser.parse_args()
    data = load_data(args.epochs, args.batch_size)
    n_steps = len(data[4][0])
    results = {}
    for label, make in (("optim", lambda: optim.Adam(**HYPER)), ("thinc", lambda: ThincAdam(**HYPER))):
        runs = [train(make(), data, args.width) for _ in range(max(1, args.repeats))]
        curve = [
            (runs[0][0][e][0], min(r[0][e][1] for r in runs), runs[0][0][e][2])
            for e in range(args.epochs)
        ]
        results[label] = (curve, runs[0][1], runs[0][2])

    print(
        f"digits MLP: Relu({args.width}) > Softmax, {len(data[0])} train / {len(data[2])} test, "
        f"batch {args.batch_size}, {n_steps} steps/epoch; optimizer time = finish_update, "
        f"best of {args.repeats}"
    )
    print(
        f"{'epoch':>5} | {'loss optim':>11} {'loss thinc':>11} {'|diff|':>9} | "
        f"{'opt ms optim':>12} {'opt ms thinc':>12} {'speedup':>7} | {'acc optim':>9} {'acc thinc':>9}"
    )
    (c_o, acc_o, avg_o), (c_t, acc_t, avg_t) = results["optim"], results["thinc"]
    for e, ((lo, to, ao), (lt, tt, at)) in enumerate(zip(c_o, c_t), 1):
        print(
            f"{e:>5} | {lo:>11.6f} {lt:>11.6f} {abs(lo - lt):>9.2e} | "
            f"{to * 1e3:>12.2f} {tt * 1e3:>12.2f} {tt / to:>6.1f}x | {ao:>9.4f} {at:>9.4f}"
        )
    tot_o, tot_t = sum(c[1] for c in c_o), sum(c[1] for c in c_t)
    print(
        f"total optimizer time: optim {tot_o * 1e3:.1f} ms, thinc {tot_t * 1e3:.1f} ms "
        f"({tot_t / tot_o:.1f}x); per step: optim {tot_o / (n_steps * args.epochs) * 1e6:.1f} us, "
        f"thinc {tot_t / (n_steps * args.epochs) * 1e6:.1f} us"
    )
    print(f"final accuracy  optim: plain {acc_o:.4f}  averaged {avg_o:.4f}")
    print(f"final accuracy  thinc: plain {acc_t:.4f}  averaged {avg_t:.4f}")


if __name__ == "__main__":
    main()
