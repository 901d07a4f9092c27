"""A plain NumPy reference optimizer, written from docs/numerics.md alone.

It is deliberately simple and independent of optim's implementation: every update is a
handful of whole-array NumPy expressions, computed by default in float64 whatever the
dtype of the arrays it is given (``compute_dtype=None`` computes in the arrays' own
dtype instead). It keeps its own state (``mom1``, ``mom2``, ``averages``, ``lookahead``,
``nr_update``) as arrays of the compute dtype and never touches the caller's arrays:
``step`` returns the new weights.

Hyperparameters are plain attributes; a test that drives optim with a schedule sets the
reference's attribute to the same value before each call.

The one knob that is not in the contract is ``radam_t_offset``: Thinc 8.3's RAdam
computes its step size with the update count one ahead (t + 1) while everything else
(Adam's bias correction, the averages) uses t. With ``radam_t_offset=1`` the reference
reproduces that, so the Thinc comparison can check that this is the only difference.
"""
import math
from typing import Dict, Hashable, Optional

import numpy

__all__ = ["ReferenceOptimizer", "radam_step_size", "radam_rho"]


def radam_rho(t: int, beta2: float) -> float:
    """rho_t of Liu et al. (PyTorch numbering: t = 1 on the first update)."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    beta2_t = beta2**t
    return rho_inf - 2.0 * t * beta2_t / (1.0 - beta2_t)


def radam_step_size(t: int, beta1: float, beta2: float):
    """(rectified, step_size) for update t, as docs/numerics.md writes it."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = radam_rho(t, beta2)
    if rho_t >= 5:
        step_size = math.sqrt(
            (1 - beta2**t)
            * (rho_t - 4)
            / (rho_inf - 4)
            * (rho_t - 2)
            / rho_t
            * rho_inf
            / (rho_inf - 2)
        ) / (1 - beta1**t)
        return True, step_size
    return False, 1.0 / (1 - beta1**t)



NORM_CHUNK = 4096  # docs/numerics.md, "The clip norm"
NORM_LANES = 32


def _lane_tree(lanes: numpy.ndarray) -> numpy.ndarray:
    """Fold the last axis (32 lanes) pairwise: lanes[j] += lanes[j + half], half 16..1."""
    lanes = lanes.copy()
    half = NORM_LANES // 2
    while half:
        lanes[..., :half] = lanes[..., :half] + lanes[..., half:2 * half]
        half //= 2
    return lanes[..., 0]


def _lane_sums(values: numpy.ndarray) -> numpy.ndarray:
    """values (..., m): lane j sums items j, j+32, ... left to right, in double."""
    m = values.shape[-1]
    rows = -(-m // NORM_LANES)
    padded = numpy.zeros(values.shape[:-1] + (rows * NORM_LANES,), dtype=numpy.float64)
    padded[..., :m] = values
    padded = padded.reshape(values.shape[:-1] + (rows, NORM_LANES))
    acc = numpy.zeros(values.shape[:-1] + (NORM_LANES,), dtype=numpy.float64)
    for r in range(rows):  # sequential: numpy.sum would sum pairwise
        acc = acc + padded[..., r, :]
    return acc


def clip_sum_squares(g: numpy.ndarray, w: numpy.ndarray, l2: float) -> float:
    """sum((g + l2*w)**2), or sum(g**2) when l2 == 0 (w is not read), in the order the
    kernels fix: each term formed in g's dtype, squared in double; chunks of 4096
    elements, 32 lanes per chunk, a pairwise lane tree; the chunk sums combined by the
    same lane rule and tree."""
    terms = g.ravel() if l2 == 0 else g.ravel() + g.dtype.type(l2) * w.ravel()
    terms = terms.astype(numpy.float64)
    squares = terms * terms
    n_chunks = -(-squares.size // NORM_CHUNK)
    if n_chunks == 0:
        return 0.0
    padded = numpy.zeros(n_chunks * NORM_CHUNK, dtype=numpy.float64)
    padded[:squares.size] = squares
    chunk_sums = _lane_tree(_lane_sums(padded.reshape(n_chunks, NORM_CHUNK)))
    return float(_lane_tree(_lane_sums(chunk_sums)))

class ReferenceOptimizer:
    def __init__(
        self,
        learn_rate: float = 0.001,
        *,
        L2: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        grad_clip: float = 1.0,
        L2_is_weight_decay: bool = True,
        use_averages: bool = True,
        use_radam: bool = False,
        weight_decay: float = 0.0,
        lookahead_k: int = 0,
        lookahead_alpha: float = 0.5,
        compute_dtype: Optional[str] = "float64",
        radam_t_offset: int = 0,
    ):
        self.learn_rate = learn_rate
        self.L2 = L2
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.grad_clip = grad_clip
        self.L2_is_weight_decay = L2_is_weight_decay
        self.use_averages = use_averages
        self.use_radam = use_radam
        self.weight_decay = weight_decay
        self.lookahead_k = lookahead_k
        self.lookahead_alpha = lookahead_alpha
        self.compute_dtype = compute_dtype
        self.radam_t_offset = radam_t_offset
        self.nr_update: Dict[Hashable, int] = {}
        self.mom1: Dict[Hashable, numpy.ndarray] = {}
        self.mom2: Dict[Hashable, numpy.ndarray] = {}
        self.averages: Optional[Dict[Hashable, numpy.ndarray]] = (
            {} if use_averages else None
        )
        self.lookahead: Dict[Hashable, numpy.ndarray] = {}

    # What kind of update runs (docs/numerics.md, "Which update runs").
    def kind(self) -> str:
        if self.use_radam:
            return "radam"
        if self.beta1 == 0 and self.beta2 == 0:
            return "sgd"
        return "adam"

    def step(self, key, weights, gradient, lr_scale: float = 1.0) -> numpy.ndarray:
        """One update of `key`. Returns the new weights (compute dtype); the caller's
        arrays are not modified. The gradient's zeroing is the caller's to check."""
        dtype = numpy.dtype(self.compute_dtype or weights.dtype)
        w = numpy.array(weights, dtype=dtype, copy=True)
        g = numpy.array(gradient, dtype=dtype, copy=True)
        assert w.shape == g.shape
        if key not in self.nr_update:
            self.nr_update[key] = 0
            self.lookahead[key] = w.copy()  # slow weights: the weights before update 1
            self.mom1[key] = numpy.zeros_like(w)
            self.mom2[key] = numpy.zeros_like(w)
            if self.averages is not None:
                self.averages[key] = numpy.zeros_like(w)
        self.nr_update[key] += 1
        t = self.nr_update[key]
        s = float(lr_scale)
        lr = float(self.learn_rate)
        beta1 = float(self.beta1)
        beta2 = float(self.beta2)

        # --- per-call scalars, in double ---
        coupled = self.L2 != 0 and not self.L2_is_weight_decay
        decoupled = self.L2 != 0 and self.L2_is_weight_decay
        l2 = float(self.L2) if coupled else 0.0
        post_decay = lr * s * float(self.L2) if decoupled else 0.0

        g_eff = g + l2 * w if l2 else g
        clip_scale = 1.0
        if self.grad_clip > 0:
            norm = math.sqrt(clip_sum_squares(g, w, l2))
            if norm >= self.grad_clip:
                clip_scale = float(self.grad_clip) / norm
        if clip_scale != 1.0:
            g_eff = g_eff * clip_scale

        kind = self.kind()
        if kind == "sgd":
            w_new = w - (lr * s) * g_eff
        else:
            m = self.mom1[key]
            v = self.mom2[key]
            m[...] = beta1 * m + (1 - beta1) * g_eff
            v[...] = beta2 * v + (1 - beta2) * g_eff * g_eff
            if kind == "adam":
                step_lr = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) * s
                w_new = w - step_lr * (m / (numpy.sqrt(v) + self.eps))
            else:
                rectified, step_size = radam_step_size(
                    t + self.radam_t_offset, beta1, beta2
                )
                step_lr = lr * s * step_size
                pre_decay = float(self.weight_decay) * lr * s
                w_pre = w - pre_decay * w
                if rectified:
                    w_new = w_pre - step_lr * (m / (numpy.sqrt(v) + self.eps))
                else:
                    w_new = w_pre - step_lr * m
        w_new = w_new - post_decay * w_new

        if self.lookahead_k > 0 and t % self.lookahead_k == 0:
            slow = self.lookahead[key]
            slow[...] = slow + float(self.lookahead_alpha) * (w_new - slow)
            w_new = slow.copy()

        if self.averages is not None:
            avg_keep = min((1.0 + t) / (10.0 + t), 0.9999)
            avg = self.averages[key]
            avg[...] = avg - (1 - avg_keep) * (avg - w_new)
        return w_new
