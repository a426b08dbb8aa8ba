"""When a gateway's ``PublishBatch`` call may go, so a refused call keeps its place.

A gateway keeps several calls in flight, and the server stores them in the order
it takes them. When storage is behind, the server may refuse a call
(RESOURCE_EXHAUSTED with a retry delay, nothing of it stored), and the gateway sends
it again after the delay. Had the calls made after it gone meanwhile and been taken,
the resent fixes would be stored after newer fixes of the same devices: late fixes,
which the live position and the processors see out of order. :class:`CallOrder`
decides when each call may be sent:

* while no call is refused, at once: calls are pipelined;
* a refused call goes again (after its delay) once every call made before it has
  been answered; refused calls go one at a time, in the order they were made;
* a call made after a refused one waits until that one has been answered; then the
  calls held behind it go together, pipelined again.

Calls already sent when a refusal comes back are not held back: one made after the
refused call may still be taken before it.

>>> order = CallOrder()
>>> first, second = order.call(), order.call()
>>> second.refused()
>>> third = order.call()
>>> [order.may_go(call.number) for call in (first, second, third)]
[True, False, False]
"""

from __future__ import annotations

import asyncio


class CallOrder:
    """The calls of one gateway, numbered in the order they were made."""

    def __init__(self) -> None:
        self._made = 0
        self._open: set[int] = set()  # made, neither answered nor refused
        self._refused: set[int] = set()  # refused and not answered since
        self._changed = asyncio.Event()

    def call(self) -> OrderedCall:
        """The next call (it waits when an earlier one is refused)."""
        number = self._made
        self._made += 1
        self._open.add(number)
        return OrderedCall(self, number)

    @property
    def holding(self) -> bool:
        """Whether calls are held back: a refused call is not yet answered."""
        return bool(self._refused)

    def may_go(self, number: int) -> bool:
        """Whether call ``number`` may be sent (again) now."""
        if not self._refused:
            return True
        first = min(self._refused)
        if number != first:
            return number < first
        return not any(n < number for n in self._open)

    async def turn(self, number: int) -> None:
        """Wait until call ``number`` may be sent."""
        while not self.may_go(number):
            await self._changed.wait()

    def refused(self, number: int) -> None:
        """Call ``number`` was refused: it and the calls made after it wait."""
        self._open.discard(number)
        self._refused.add(number)
        self._change()

    def settled(self, number: int) -> None:
        """Call ``number`` was answered, or given up: calls behind it may go."""
        self._open.discard(number)
        self._refused.discard(number)
        self._change()

    def _change(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class OrderedCall:
    """One call of a :class:`CallOrder`; settled when its ``with`` block ends."""

    __slots__ = ("_order", "number")

    def __init__(self, order: CallOrder, number: int) -> None:
        self._order = order
        self.number = number

    async def turn(self) -> None:
        """Wait until this call may be sent (at once unless calls are held)."""
        await self._order.turn(self.number)

    def refused(self) -> None:
        self._order.refused(self.number)

    def __enter__(self) -> OrderedCall:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._order.settled(self.number)
