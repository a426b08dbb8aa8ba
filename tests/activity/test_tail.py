"""The activity tail hands over and replaces the rows of the devices a batch names,
and compacts without losing or reordering any device's rows."""

import numpy as np

from tracking_grpc.activity.tail import Tail
from tracking_grpc.core.fixes import FixBatch


def rows_of(slots: list[int], first_seq: int) -> tuple[FixBatch, np.ndarray]:
    n = len(slots)
    batch = FixBatch.from_columns(
        "t",
        [f"dev-{s}" for s in slots],
        np.arange(first_seq, first_seq + n),
        np.arange(n) * 1000,
        np.full(n, 47.0),
        np.full(n, 8.0),
        accuracy_m=np.arange(n, dtype=np.float32),
    )
    return batch, np.array(slots, dtype=np.intp)


def test_take_returns_only_the_named_devices_rows_in_order():
    tail = Tail()
    batch, slots = rows_of([0, 0, 2, 2, 2, 5], 1)
    tail.replace(np.array([0, 2, 5]), batch, slots)
    got, got_slot = tail.take(np.array([2, 5, 9]))
    assert got is not None
    assert got_slot.tolist() == [2, 2, 2, 5]
    assert got.seq.tolist() == [3, 4, 5, 6]
    assert got.device.tolist() == ["dev-2"] * 3 + ["dev-5"]
    assert got.accuracy_m.tolist() == [2.0, 3.0, 4.0, 5.0]
    assert len(tail) == 6


def test_replacing_with_nothing_empties_a_device():
    tail = Tail()
    batch, slots = rows_of([1, 1, 3], 1)
    tail.replace(np.array([1, 3]), batch, slots)
    empty, none = rows_of([], 1)
    tail.replace(np.array([1]), empty, none)
    got, got_slot = tail.take(np.array([1, 3]))
    assert got is not None and got_slot.tolist() == [3]
    assert tail.take(np.array([1]))[0] is None
    assert len(tail) == 1


def test_many_replacements_match_a_plain_model_through_compactions():
    rng = np.random.default_rng(7)
    tail, model = Tail(), {}
    seq = 1
    for _ in range(400):
        named = np.unique(rng.integers(0, 300, rng.integers(1, 40)))
        slots = sorted(
            s for s in named.tolist() for _ in range(int(rng.integers(0, 6)))
        )
        batch, row_slot = rows_of(slots, seq)
        seq += len(slots)
        tail.replace(named, batch, row_slot)
        for s in named.tolist():
            model[s] = batch.seq[row_slot == s].tolist()
        asked = np.unique(rng.integers(0, 300, 30))
        got, got_slot = tail.take(asked)
        expected = [q for s in asked.tolist() for q in model.get(s, [])]
        assert (got.seq.tolist() if got is not None else []) == expected
        assert got_slot.tolist() == [
            s for s in asked.tolist() for _ in model.get(s, [])
        ]
    assert len(tail) == sum(len(v) for v in model.values())
