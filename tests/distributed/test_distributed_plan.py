"""optim.distributed's ownership and layout plan (optim/distributed/plan.py), without
processes: owners depend only on keys and sizes, every rank computes the same layout,
and the layout's offsets are the tensors end to end, grouped by owner."""
import heapq

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optim.distributed import plan

SIZES = st.lists(st.integers(0, 10_000), max_size=40)
WORLDS = st.integers(1, 9)


def keys_for(sizes):
    return [(i, "W") for i in range(len(sizes))]


def reference_owners(keys, nbytes, loads):
    """Largest first (ties by repr), each to the least-loaded rank (ties to the lowest),
    spelled with a heap of (load, rank)."""
    heap = [(load, rank) for rank, load in enumerate(loads)]
    heapq.heapify(heap)
    owners = {}
    for key in sorted(keys, key=lambda k: (-nbytes[k], repr(k))):
        load, rank = heapq.heappop(heap)
        owners[key] = rank
        heapq.heappush(heap, (load + nbytes[key], rank))
    return owners


# ---------------------------------------------------------------- owners

def test_owners_balance_by_size_independent_of_call_order():
    rng = numpy.random.default_rng(0)
    sizes = [int(n) for n in rng.integers(1, 5000, size=60)]
    keys = [(i, "W") for i in range(len(sizes))]
    for world in (2, 3):
        owners = []
        for order in (rng.permutation(len(sizes)), rng.permutation(len(sizes))):
            owners.append(plan.assign_owners([keys[i] for i in order],
                                             {k: s * 4 for k, s in zip(keys, sizes)},
                                             [0] * world))
        assert owners[0] == owners[1]
        loads = [sum(s for k, s in zip(keys, sizes) if owners[0][k] == r) for r in range(world)]
        assert max(loads) <= 1.05 * sum(sizes) / world, loads


@settings(max_examples=200, deadline=None)
@given(SIZES, WORLDS, st.randoms(use_true_random=False))
def test_every_key_has_one_owner_deterministically_and_balanced(sizes, world, rnd):
    keys = keys_for(sizes)
    nbytes = dict(zip(keys, sizes))
    loads = [0] * world
    owners = plan.assign_owners(keys, nbytes, loads)
    assert loads == [0] * world  # not changed
    assert sorted(owners) == sorted(keys)  # every key, once
    assert all(0 <= r < world for r in owners.values())
    assert owners == reference_owners(keys, nbytes, [0] * world)
    shuffled = list(keys)
    rnd.shuffle(shuffled)
    assert plan.assign_owners(shuffled, nbytes, [0] * world) == owners
    per_rank = [sum(nbytes[k] for k in keys if owners[k] == r) for r in range(world)]
    # largest first to the least loaded: no rank exceeds another by more than one key
    assert max(per_rank) - min(per_rank) <= max(sizes, default=0)


@settings(max_examples=100, deadline=None)
@given(SIZES, st.lists(st.integers(0, 50_000), min_size=1, max_size=6))
def test_owners_count_from_what_each_rank_owns(sizes, loads):
    keys = keys_for(sizes)
    nbytes = dict(zip(keys, sizes))
    assert plan.assign_owners(keys, nbytes, loads) == reference_owners(keys, nbytes, loads)


def test_owner_edge_cases():
    assert plan.assign_owners([], {}, [0, 0, 0]) == {}
    # more ranks than keys: one key per rank, the largest on rank 0
    assert plan.assign_owners(["a", "b", "c"], {"a": 1, "b": 3, "c": 2}, [0] * 8) == \
        {"b": 0, "c": 1, "a": 2}
    # equal sizes: by repr
    assert plan.assign_owners(["y", "x"], {"x": 5, "y": 5}, [0, 0]) == {"x": 0, "y": 1}
    # one huge key: alone on its rank; the others fill the rest
    nbytes = {"huge": 10 ** 9, **{f"k{i}": 100 for i in range(10)}}
    owners = plan.assign_owners(list(nbytes), nbytes, [0, 0, 0])
    assert owners["huge"] == 0
    assert all(owners[k] != 0 for k in nbytes if k != "huge")
    assert {r: sum(nbytes[k] for k in owners if owners[k] == r) for r in (1, 2)} == \
        {1: 500, 2: 500}
    # one rank owns everything
    assert set(plan.assign_owners(list(nbytes), nbytes, [0]).values()) == {0}


def test_state_owners_count_keys_without_state_as_float32():
    keys = ["a", "b"]
    owners, nbytes = plan.state_owners(keys, {"a": (3, 2), "b": (5,)},
                                       {"a": numpy.dtype("float64"), "b": None}, 2)
    assert nbytes == {"a": 48, "b": 20}
    assert owners == {"a": 0, "b": 1}


def test_ownership_proposes_then_commits_in_call_order():
    seen = plan.Ownership()
    nbytes = {"small": 4, "big": 400, "mid": 40}
    owners = seen.propose(["small", "big", "mid"], nbytes, 2)
    assert owners == {"big": 0, "mid": 1, "small": 1}
    assert seen.owner == {} and seen.order == [] and seen.loads == [0, 0]  # not committed
    seen.commit(["small", "big", "mid"], owners, nbytes)
    assert seen.order == ["small", "big", "mid"]
    assert seen.loads == [400, 44]
    # later keys go where the load is least
    assert seen.propose(["new"], {"new": 10}, 2) == {"new": 1}
    # a new world size starts the loads afresh
    assert seen.propose(["new"], {"new": 10}, 3) == {"new": 0} and seen.loads == [0, 0, 0]


def test_ownership_reset_rename_and_order():
    seen = plan.Ownership()
    f32 = numpy.dtype("float32")
    seen.reset(["a", "b", "c"], {"a": (2,), "b": (3,), "c": (4,)}, {"a": f32, "b": None,
               "c": f32}, {"a": 1, "b": 0, "c": 1}, {"a": 8, "b": 12, "c": 16}, 2)
    assert seen.loads == [12, 24]
    assert seen.with_state() == ["a", "c"]
    assert seen.ordered(["zz", "c", "a"]) == ["a", "c", "zz"]  # never seen: last
    seen.rename({"a": "A"})
    assert seen.order == ["A", "b", "c"] and seen.owner["A"] == 1 and "a" not in seen.shapes
    seen.see("b", [3], "float64")
    assert seen.shapes["b"] == (3,) and seen.dtypes["b"] == numpy.dtype("float64")


# ---------------------------------------------------------------- layouts

def check_layout(layout, sizes, owner_of, world):
    """The offsets are the sizes end to end, in (owner, position) order; each rank's
    tensors are one region, the regions tile [0, total] in rank order."""
    assert layout.index == sorted(layout.index, key=lambda i: (owner_of[i], i))
    assert list(layout.starts) == [0, *numpy.cumsum([sizes[i] for i in layout.index])]
    assert len(layout.regions) == world
    at = 0
    for rank, (lo, hi) in enumerate(layout.regions):
        assert lo == at and hi >= lo
        mine = [i for i in layout.index if owner_of[i] == rank]
        assert hi - lo == sum(sizes[i] for i in mine)
        at = hi
    assert at == layout.total == sum(sizes[i] for i in layout.index)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5),
                          st.sampled_from(["float32", "float64"])), max_size=30),
       WORLDS, st.booleans())
def test_step_plan_layouts(spec, world, sharded):
    keys = [f"k{i}" for i in range(len(spec))]
    shapes = [(a, b) for a, b, _ in spec]
    dtypes = [numpy.dtype(d) for _, _, d in spec]
    sizes = [a * b for a, b in shapes]
    live = [k for k, n in zip(keys, sizes) if n]
    owners = plan.assign_owners(live, {k: n for k, n in zip(keys, sizes) if n}, [0] * world)
    owner_of = [owners.get(k, -1) for k in keys]
    for rank in range(world):
        step = plan.step_plan(keys, shapes, dtypes, owners, world, rank, sharded)
        assert step.keys == keys and step.shapes == shapes
        assert list(step.typenums) == [d.num for d in dtypes]
        # one layout per dtype of the non-empty tensors, in dtype.str order
        want = sorted({d.str for d, n in zip(dtypes, sizes) if n})
        assert [layout.dtype.str for layout in step.layouts] == want
        in_layouts = sorted(i for layout in step.layouts for i in layout.index)
        assert in_layouts == [i for i, n in enumerate(sizes) if n]  # each non-empty once
        for layout in step.layouts:
            assert all(dtypes[i] == layout.dtype for i in layout.index)
            check_layout(layout, sizes, owner_of, world)
        assert step.local == [i for i, n in enumerate(sizes)
                              if n and (not sharded or owners[keys[i]] == rank)]
        for layout, ends in zip(step.layouts, step.local_ends):
            assert ends == [(int(layout.starts[j + 1]), i) for j, i in enumerate(layout.index)
                            if i in step.local]
        again = plan.step_plan(list(keys), list(shapes), list(dtypes), dict(owners), world,
                               rank, sharded)
        assert [(l.index, list(l.starts), l.regions) for l in again.layouts] == \
            [(l.index, list(l.starts), l.regions) for l in step.layouts]


def test_step_plan_edge_cases():
    empty = plan.step_plan([], [], [], {}, 2, 0, True)
    assert empty.layouts == [] and empty.local == [] and empty.local_ends == []
    # more ranks than keys: the ranks without keys have empty regions where they stand
    step = plan.step_plan(["a", "b"], [(3,), (2,)], ["float32"] * 2, {"a": 2, "b": 0}, 4, 1,
                          True)
    (layout,) = step.layouts
    assert layout.index == [1, 0] and list(layout.starts) == [0, 2, 5]
    assert layout.regions == [(0, 2), (2, 2), (2, 5), (5, 5)]
    assert step.local == []  # rank 1 owns nothing
    # only empty gradients: nothing travels
    assert plan.step_plan(["a"], [(0, 4)], ["float64"], {}, 2, 0, False).layouts == []


def test_state_layouts_group_each_dtype_by_owner():
    seen = plan.Ownership()
    f32, f64 = numpy.dtype("float32"), numpy.dtype("float64")
    keys = ["a", "b", "c", "d"]
    seen.reset(keys, {"a": (2,), "b": (3,), "c": (4, 2), "d": (5,)},
               {"a": f32, "b": f64, "c": f32, "d": None}, {"a": 1, "b": 0, "c": 0, "d": 1},
               {"a": 8, "b": 24, "c": 32, "d": 20}, 2)
    state = seen.with_state()
    f32_layout, f64_layout = seen.state_layouts(state, 2)
    assert f32_layout.dtype == f32 and f32_layout.index == [2, 0]
    assert list(f32_layout.starts) == [0, 8, 10] and f32_layout.regions == [(0, 8), (8, 10)]
    assert f64_layout.index == [1] and f64_layout.regions == [(0, 3), (3, 3)]


def test_summed_positions_return_each_local_tensor_once():
    summed = plan.summed_positions([(4, 7), (10, 2), (10, 5), (30, 0)])
    assert summed(3) == []
    assert summed(10) == [7, 2, 5]
    assert summed(10) == []
    assert summed(29) == []
    assert summed(100) == [0]


def test_plan_repeats_only_the_same_step():
    w = [numpy.zeros((2, 3), "float32"), numpy.zeros(4, "float64")]
    g = [numpy.ones((2, 3), "float32"), numpy.ones(4, "float64")]
    step = plan.step_plan(["a", "b"], [(2, 3), (4,)], ["float32", "float64"],
                          {"a": 0, "b": 1}, 2, 0, True)

    def check(key, weights, gradient):
        raise AssertionError("host arrays are checked in C")

    assert step.repeats(["a", "b"], w, g, check)
    assert not step.repeats(["b", "a"], w, g, check)
    assert not step.repeats(["a", "b"], w, [g[0], g[1].astype("float32")], check)
    assert not step.repeats(["a", "b"], w, [g[0].reshape(3, 2), g[1]], check)
    assert not step.repeats(["a", "b"], w[:1], g, check)


@pytest.mark.parametrize("mb, dtype, want", [(25.0, "float32", 25 * 2 ** 18),
                                             (1.0, "float64", 2 ** 17),
                                             (1e-9, "float64", 1)])
def test_bucket_elems(mb, dtype, want):
    assert plan.bucket_elems(mb, numpy.dtype(dtype)) == want
    assert plan.DEFAULT_BUCKET_MB == 25.0  # torch DDP's
