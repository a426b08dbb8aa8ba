"""When a gateway's calls may go (``client.order``): at once while none is refused;
a refused call once every earlier call is answered, the calls made after it once it
is answered. Against a server: tests/test_gateway_congestion.py."""

from __future__ import annotations

import asyncio

import pytest

from tracking_grpc.client.order import CallOrder

# Each case: what happens to calls 0.. (made in that order: "make N" makes one,
# "refuse N", "answer N"), then which of them may go.
CASES = [
    pytest.param(
        ["make 0", "make 1", "make 2"], {0: True, 1: True, 2: True}, id="pipelined"
    ),
    pytest.param(
        ["make 0", "make 1", "refuse 0", "make 2"],
        {0: True, 2: False},
        id="later-calls-wait-behind-a-refused-one",
    ),
    pytest.param(
        ["make 0", "make 1", "refuse 1", "make 2"],
        {0: True, 1: False, 2: False},
        id="a-refused-call-waits-for-earlier-ones-in-flight",
    ),
    pytest.param(
        ["make 0", "make 1", "refuse 1", "answer 0"],
        {1: True},
        id="a-refused-call-goes-once-earlier-ones-are-answered",
    ),
    pytest.param(
        ["make 0", "make 1", "refuse 1", "refuse 0", "make 2"],
        {0: True, 1: False, 2: False},
        id="refused-calls-go-in-the-order-they-were-made",
    ),
    pytest.param(
        ["make 0", "refuse 0", "make 1", "make 2", "answer 0"],
        {1: True, 2: True},
        id="held-calls-go-together-once-the-refused-one-is-answered",
    ),
    pytest.param(
        ["make 0", "make 1", "refuse 0", "refuse 1", "make 2", "answer 0"],
        {1: True, 2: False},
        id="held-calls-wait-for-every-refused-call-before-them",
    ),
]


@pytest.mark.parametrize(("steps", "may_go"), CASES)
def test_when_calls_may_go(steps: list[str], may_go: dict[int, bool]) -> None:
    order = CallOrder()
    for step in steps:
        what, number = step.split()
        if what == "make":
            assert order.call().number == int(number)
        elif what == "refuse":
            order.refused(int(number))
        else:
            order.settled(int(number))
    assert {n: order.may_go(n) for n in may_go} == may_go


async def test_a_held_call_goes_when_the_refused_one_is_answered() -> None:
    order = CallOrder()
    with order.call() as refused:
        refused.refused()
        later = asyncio.ensure_future(order.call().turn())
        await asyncio.sleep(0)
        assert not later.done() and order.holding
    await asyncio.wait_for(later, 5)
