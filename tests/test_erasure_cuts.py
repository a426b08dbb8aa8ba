"""Erasure cut-offs: the processors drop an erased device's fixes of the commits up
to its cut-off, and nothing else."""

from __future__ import annotations

from tracking_grpc.core.fixes import FixBatch
from tracking_grpc.erasure_cuts import ErasureCuts


def commit_of(tenant: str, devices: list[str]) -> FixBatch:
    n = len(devices)
    return FixBatch.from_columns(
        tenant, devices, range(1, n + 1), [1_000 * s for s in range(1, n + 1)],
        [60.17] * n, [24.94] * n,
    )  # fmt: skip


def test_a_cut_drops_the_device_up_to_its_commit_in_its_tenant_only() -> None:
    cuts = ErasureCuts()
    assert not cuts
    cuts.add("t", "van", 5)
    fixes = commit_of("t", ["car", "van", "bus", "van"])

    assert cuts.cut(fixes, 5).device.tolist() == ["car", "bus"]
    assert cuts.cut(fixes, 6) is fixes  # after the erasure: new data
    other = commit_of("u", ["van"])
    assert cuts.cut(other, 1) is other  # the same id in another tenant
    unaffected = commit_of("t", ["car"])
    assert cuts.cut(unaffected, 1) is unaffected


def test_a_later_cut_of_a_device_wins_and_passed_cuts_go() -> None:
    cuts = ErasureCuts()
    cuts.add("t", "van", 5)
    cuts.add("t", "van", 3)  # a notice heard late changes nothing
    cuts.add("t", "car", 8)
    fixes = commit_of("t", ["van", "car"])
    assert len(cuts.cut(fixes, 5)) == 0

    cuts.passed(5)
    assert cuts.cut(fixes, 5).device.tolist() == ["van"]
    cuts.passed(8)
    assert not cuts
