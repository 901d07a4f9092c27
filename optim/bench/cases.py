"""What is benchmarked: the optimizer specs, the bytes model, the run's `Config` and the
configurations (`Case`) it expands to."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

SCHEMA_VERSION = 1
PROG = "python -m optim bench"
LEARN_RATE = 0.001


@dataclass(frozen=True)
class Spec:
    """One optimizer configuration."""

    name: str  # CLI name
    label: str  # table label
    kind: str  # "sgd", "adam", "radam"
    grad_clip: float
    use_averages: bool

    @property
    def kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for optim's and Thinc's constructors."""
        return dict(learn_rate=LEARN_RATE, L2=0.0, grad_clip=self.grad_clip,
                    use_averages=self.use_averages)

    @property
    def n_arrays(self) -> int:
        """Arrays read and written once per update: w, g (+ m, v) (+ averages)."""
        return (2 if self.kind == "sgd" else 4) + (1 if self.use_averages else 0)

    @property
    def clips(self) -> bool:
        return self.grad_clip > 0

    def bytes_per_param(self, itemsize: int) -> int:
        """The bytes model: each array read+written once, + one read of g to clip (L2 is
        0 here, so the clip norm reads g alone, docs/numerics.md)."""
        return itemsize * (2 * self.n_arrays + (1 if self.clips else 0))


SPECS: Dict[str, Spec] = {
    s.name: s
    for s in (
        Spec("sgd", "SGD", "sgd", 0.0, False),
        Spec("adam", "Adam", "adam", 0.0, False),
        Spec("radam", "RAdam", "radam", 0.0, False),
        Spec("adam-thinc", "Adam (Thinc defaults: clip+averages)", "adam", 1.0, True),
    )
}
DTYPES = ("float32", "float64")
LAYOUTS = ("one", "many")
PEERS = ("thinc", "torch", "numpy")
DEFAULT_SIZES = (10**3, 10**4, 10**5, 10**6, 10**7)
QUICK_SIZES = (10**3, 10**4)
OVERHEAD_PARAMS = 8

BYTES_MODEL = (
    "bytes/param = itemsize x (2 x arrays read and written once + 1 if clipping reads g "
    "once more for its norm). float32: SGD (w, g) 16 B; Adam and RAdam (w, g, m, v) 32 B; "
    "averages add 8 B (avg read+written); clipping adds 4 B (with L2 0 or decoupled the "
    "norm reads g alone); Adam with Thinc's defaults "
    "44 B. float64: twice that. GB/s uses this model for every implementation (the work "
    "the update has to do), not what each implementation actually moves (Thinc makes "
    "several passes; torch leaves g alone, 28 B for lean Adam)."
)


@dataclass
class Config:
    """Everything a run needs; ``parse_args`` builds one from the command line."""

    optimizers: List[str] = field(default_factory=lambda: list(SPECS))
    sizes: List[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    dtypes: List[str] = field(default_factory=lambda: ["float32"])
    layouts: List[str] = field(default_factory=lambda: list(LAYOUTS))
    tensor_size: int = 1000
    repeats: Optional[int] = None  # None: by size, see repeats_for
    threads: int = 1
    device: str = "cpu"
    compare: List[str] = field(default_factory=list)
    json_path: Optional[str] = None
    quick: bool = False
    progress: bool = True
    overhead: bool = True
    min_block_s: float = 1e-4
    clock: str = "auto"
    groups: int = 0  # > 0: also time optim with this many per-parameter groups bound
    nonfinite: str = "apply"  # skip / raise: also time optim in that mode

    @property
    def resolved_clock(self) -> str:
        """auto: thread CPU time when everything timed runs on this one thread."""
        if self.clock != "auto":
            return self.clock
        return "cpu" if self.device == "cpu" and self.threads == 1 else "wall"

    def repeats_for(self, n: int) -> int:
        if self.repeats is not None:
            return self.repeats
        if self.quick:
            return 3
        if n <= 10**5:
            return 31
        if n <= 10**6:
            return 15
        return 7

    def n_tensors(self, n: int, layout: str) -> int:
        return 1 if layout == "one" else n // self.tensor_size


@dataclass
class Case:
    spec: Spec
    dtype: str
    n: int  # parameters in all
    layout: str
    sizes: List[int]  # parameters per tensor
    section: str = "main"  # or "overhead"

    @property
    def keys(self) -> List[Tuple[int, str]]:
        return [(i, "W") for i in range(len(self.sizes))]


def _cases(cfg: Config) -> List[Case]:
    cases = []
    if cfg.overhead:
        for name in cfg.optimizers:
            cases.append(Case(SPECS[name], cfg.dtypes[0], OVERHEAD_PARAMS, "one",
                              [OVERHEAD_PARAMS], section="overhead"))
    for name in cfg.optimizers:
        for dtype in cfg.dtypes:
            for n in cfg.sizes:
                for layout in cfg.layouts:
                    if layout == "one":
                        sizes = [n]
                    else:
                        count = cfg.n_tensors(n, layout)
                        if count < 10:
                            continue
                        sizes = [cfg.tensor_size] * count
                        sizes[-1] += n - cfg.tensor_size * count
                    cases.append(Case(SPECS[name], dtype, n, layout, sizes))
    return cases
