"""Scratch memory of the GPU path, and who owns it (docs/gpu.md, "Concurrency").

The clip norm needs, per tensor, its chunk sums, a completion ticket and a place for
the clip factor; an unclipped update needs a 1.0 to read as its factor. All of it is
owned by the key's plan (one-tensor updates) or by the step_many segment's tables, never
by a device or a stream:

* Only launches that also write the key's weights use it, so whatever orders two
  updates of one key (one stream, an event, a synchronisation: the user's job, as for
  the weights themselves) orders its scratch memory too. Two host threads, two streams
  (per-thread default streams, a reused stream handle), two devices: updates of
  different keys never share a byte; nothing depends on which stream is current.
* It is allocated and initialised once, at the plan (the key's first update, on that
  update's stream, before its launches), sized for the key, and never reallocated or
  freed while the plan lives: a CUDA graph that captured an update keeps valid
  addresses whatever is updated eagerly afterwards.
* The ticket is epoch-tagged (`optim_finished_last_chunk` in the CUDA source): each
  clipped launch passes a new epoch, a host-side count, and the launch's first chunk
  restarts a ticket of any other epoch. A disturbed ticket (a stray write, an
  interrupted launch) can spoil no later launch, at no cost: no reset, no host sync,
  no extra device operation, one more kernel argument.

The non-finite skip's verdict (a status) lives in the step_many coefficient row beside
the clip factor (`_tables.DEVICE_SLOTS`), written by the norm kernel's last warp with
the clip factor; a per-call update that checks its gradient (skip or raise mode) runs
step_many's kernels on a one-tensor table its plan keeps, so the per-call scratch here
is apply mode's only. A skip-mode key's update count on the device is its plan's
(`Plan.counter`, handed on to the key's next plan), used only by launches that also
write the key's weights, like everything here (docs/gpu.md, "Groups and the non-finite
skip").
"""
from typing import Any

import numpy

EPOCHS = 0xFFFFFFFF  # epochs run 1 .. EPOCHS; 0 marks an idle ticket
CLIP = 0  # factors[CLIP]: the clip factor, written by the norm kernel
ONE = 1  # factors[ONE]: 1.0, what an unclipped update reads as its factor
FACTORS = 2


def next_epoch(epoch: int) -> int:
    """The epoch after `epoch` (1 .. EPOCHS, never 0)."""
    return epoch % EPOCHS + 1


class Workspace:
    """One key's clip-norm scratch memory on its device (see the module docstring).

    `factors[CLIP]` / `factors[ONE]` are what the update reads (`clip` / `one`: the
    one-element views passed as its `clip_factor`); `tickets` the completion ticket;
    `partials` the chunk sums; `epoch` the last clipped launch's epoch (host side).
    """

    __slots__ = ("factors", "clip", "one", "tickets", "partials", "epoch")

    def __init__(self, cupy: Any, n_chunks: int) -> None:
        # ones: the factor slot reads 1.0 until the first clip norm writes it; zeros: an
        # idle ticket. Both fills queue on the current stream, ahead of the key's launches.
        self.factors = cupy.ones(FACTORS, dtype=numpy.float64)
        self.clip = self.factors[CLIP:CLIP + 1]
        self.one = self.factors[ONE:ONE + 1]
        self.tickets = cupy.zeros(1, dtype=numpy.uint64)
        self.partials = cupy.empty(max(n_chunks, 1), dtype=numpy.float64)
        self.epoch = 0

    def next_epoch(self) -> int:
        """A new epoch for the next clipped launch (host arithmetic only)."""
        self.epoch = epoch = next_epoch(self.epoch)
        return epoch


def capturing(cupy: Any) -> bool:
    """Whether CuPy's current stream is capturing a CUDA graph (False where the stream
    cannot tell, e.g. an old CuPy). The legacy null stream never captures, and asking
    it while another stream captures is itself an error in CUDA: it is not asked."""
    stream = cupy.cuda.get_current_stream()
    is_capturing = getattr(stream, "is_capturing", None)
    if is_capturing is None or stream.ptr in (0, 1):
        return False
    return bool(is_capturing())


def refuse_capture(cupy: Any, what: str) -> None:
    """RuntimeError if the current stream is capturing: `what` allocates or uploads."""
    if capturing(cupy):
        raise RuntimeError(
            f"{what} cannot be captured in a CUDA graph: it allocates device memory or "
            "copies from the host. Capture per-call updates (optimizer(key, w, g)) of "
            "keys updated once, outside the capture, with the same hyperparameters "
            "(docs/gpu.md, 'CUDA graphs')")
