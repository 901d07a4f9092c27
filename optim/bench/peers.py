"""The implementations timed: optim, the peers (Thinc, torch, NumPy) and the roofline.

Each builder allocates its own arrays for one configuration and returns a function that
performs ONE update of all its tensors."""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

from .cases import LEARN_RATE, Case, Spec
from .devices import Device
from .errors import Skip


def _arrays(dev: Device, case: Case) -> Tuple[List[Any], List[Any]]:
    ws = [dev.filled(s, case.dtype, 0.5) for s in case.sizes]
    gs = [dev.filled(s, case.dtype, 0.0) for s in case.sizes]
    return ws, gs


def build_optim(dev: Device, case: Case, groups: int = 0,
                nonfinite: str = "apply") -> Callable[[], Any]:
    """optim's update; groups > 0: with that many groups bound (group j: learn rate
    times 0.5**(j+1); the tensors dealt round-robin, a lone tensor in group 0)."""
    import optim

    cls = {"sgd": optim.SGD, "adam": optim.Adam, "radam": optim.RAdam}[case.spec.kind]
    specs = [{"match": f"g{j}/*", "learn_rate_scale": 0.5 ** (j + 1)} for j in range(groups)]
    opt = cls(**case.spec.kwargs, groups=specs or None, nonfinite=nonfinite)
    ws, gs = _arrays(dev, case)
    keys = case.keys
    if groups:
        paths = {("unused", j): f"g{j}/unused" for j in range(groups)}  # every group binds
        paths.update((key, f"g{i % groups}/{key[1]}{i}") for i, key in enumerate(keys))
        opt.bind(paths)
    if case.layout == "one":
        return partial(opt, keys[0], ws[0], gs[0])
    if not hasattr(opt, "step_many"):
        raise Skip("optim has no step_many")
    return partial(opt.step_many, keys, ws, gs)


def build_optim_one_thread(dev: Device, case: Case) -> Callable[[], Any]:
    """optim's update on one thread, beside a run with --threads N (the scaling)."""
    step = build_optim(dev, case)
    step.threads = 1
    return step


def build_thinc(dev: Device, case: Case) -> Callable[[], Any]:
    import thinc.api

    cls = {"sgd": thinc.api.SGD, "adam": thinc.api.Adam,
           "radam": thinc.api.RAdam}[case.spec.kind]
    opt = cls(**case.spec.kwargs)
    ws, gs = _arrays(dev, case)
    triples = list(zip(case.keys, ws, gs))
    if len(triples) == 1:
        return partial(opt, *triples[0])

    def step() -> None:  # Thinc has no multi-tensor call: a Python loop
        for key, w, g in triples:
            opt(key, w, g)

    return step


def build_torch(dev: Device, case: Case, threads: int) -> Callable[[], Any]:
    import torch

    torch.set_num_threads(threads)
    tdev = "cuda" if dev.name == "gpu" else "cpu"
    if tdev == "cuda" and not torch.cuda.is_available():
        raise Skip("torch sees no CUDA device")
    tdtype = getattr(torch, case.dtype)
    params = []
    for s in case.sizes:
        p = torch.nn.Parameter(torch.full((s,), 0.5, dtype=tdtype, device=tdev))
        p.grad = torch.full((s,), 0.0, dtype=tdtype, device=tdev)
        params.append(p)
    spec = case.spec
    if spec.kind == "sgd":
        opt = torch.optim.SGD(params, lr=LEARN_RATE, fused=True)
        variant = "fused"
    elif spec.kind == "adam":
        opt = torch.optim.Adam(params, lr=LEARN_RATE, fused=True)
        variant = "fused"
    else:  # no fused RAdam in torch
        opt = torch.optim.RAdam(params, lr=LEARN_RATE, foreach=True)
        variant = "foreach"
    step: Callable[[], Any] = opt.step
    if spec.clips or spec.use_averages:
        # Thinc's defaults in torch: clip the global gradient norm, step, then keep an
        # exponential moving average of the weights with Thinc's avg_keep schedule.
        clip = spec.grad_clip
        detached = [p.detach() for p in params]
        avgs = [d.clone() for d in detached] if spec.use_averages else []
        t = [0]

        def step() -> None:
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
            opt.step()
            if avgs:
                t[0] += 1
                keep = min((1 + t[0]) / (10 + t[0]), 0.9999)
                torch._foreach_lerp_(avgs, detached, 1.0 - keep)

        variant += "+clip" * (clip > 0) + "+avg" * bool(avgs)
    step_fn = torch.no_grad()(step)
    step_fn.variant = variant  # type: ignore[attr-defined]
    return step_fn


class NumpyOptimizer:
    """The textbook update in plain in-place NumPy (CuPy on GPU): a pass per operation,
    with a scratch array per key so nothing is allocated after a key's first update."""

    def __init__(self, xp: Any, spec: Spec) -> None:
        self.xp = xp
        self.spec = spec
        self.state: Dict[Any, list] = {}
        self.b1, self.b2, self.eps = 0.9, 0.999, 1e-8

    def __call__(self, key: Any, w: Any, g: Any) -> None:
        xp, spec = self.xp, self.spec
        st = self.state.get(key)
        if st is None:
            zeros = partial(xp.zeros_like, w)
            st = self.state[key] = [0, zeros(), zeros(), zeros(), w.copy()]
        st[0] += 1
        t, m, v, tmp, avg = st
        if spec.clips:
            norm = math.sqrt(float(xp.dot(g, g)))
            if norm >= spec.grad_clip:
                g *= spec.grad_clip / norm
        if spec.kind == "sgd":
            xp.multiply(g, LEARN_RATE, out=tmp)
            w -= tmp
        else:
            b1, b2 = self.b1, self.b2
            m *= b1
            xp.multiply(g, 1 - b1, out=tmp)
            m += tmp
            v *= b2
            xp.multiply(g, g, out=tmp)
            tmp *= 1 - b2
            v += tmp
            if spec.kind == "adam":
                lr, rectified = LEARN_RATE * math.sqrt(1 - b2**t) / (1 - b1**t), True
            else:
                rho_inf = 2 / (1 - b2) - 1
                rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
                rectified = rho_t >= 5
                if rectified:
                    lr = LEARN_RATE * math.sqrt(
                        (1 - b2**t) * (rho_t - 4) / (rho_inf - 4) * (rho_t - 2) / rho_t
                        * rho_inf / (rho_inf - 2)) / (1 - b1**t)
                else:
                    lr = LEARN_RATE / (1 - b1**t)
            if rectified:
                xp.sqrt(v, out=tmp)
                tmp += self.eps
                xp.divide(m, tmp, out=tmp)
                tmp *= lr
            else:
                xp.multiply(m, lr, out=tmp)
            w -= tmp
        g.fill(0)
        if spec.use_averages:
            keep = min((1 + t) / (10 + t), 0.9999)
            xp.subtract(avg, w, out=tmp)
            tmp *= 1 - keep
            avg -= tmp


def build_numpy(dev: Device, case: Case) -> Callable[[], Any]:
    opt = NumpyOptimizer(dev.xp, case.spec)
    ws, gs = _arrays(dev, case)
    triples = list(zip(case.keys, ws, gs))
    if len(triples) == 1:
        return partial(opt, *triples[0])

    def step() -> None:
        for key, w, g in triples:
            opt(key, w, g)

    return step


def build_roofline(dev: Device, case: Case,
                   threads: Tuple[int, ...] = (1,)) -> Dict[int, Callable[[int], Any]]:
    """The roofline on the same bytes as the update, one runner per thread count (the
    CPU roofline splits the work as optim does; the GPU one ignores threads)."""
    k = case.spec.n_arrays
    tensors = [[dev.filled(s, case.dtype, 0.5 + j) for j in range(k)] for s in case.sizes]
    run = dev.roofline(tensors, read_index=1 if case.spec.clips else None)
    return {n: partial(run, threads=n) for n in threads}


PEER_IMPORTS = {"thinc": "thinc.api", "torch": "torch", "numpy": "numpy"}
PEER_HINTS = {"thinc": "pip install thinc", "torch": "pip install torch"}


def peer_missing(peer: str) -> Optional[str]:
    """Why a peer cannot run (None if it can)."""
    try:
        __import__(PEER_IMPORTS[peer])
    except ImportError as err:
        hint = PEER_HINTS.get(peer)
        return f"not installed ({err})" + (f"; {hint}" if hint else "")
    return None
