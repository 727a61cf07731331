"""Many boxes at once, in Fabric's Group/GroupResult shape: one thread per box, and a result
that maps each box to what its work returned or the exception that stopped it, so one box's
failure neither hides the others' results nor leaves their threads behind."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from kseries.testbox.box import Box

T = TypeVar("T")


class GroupResult(dict[str, "T | BaseException"], Generic[T]):
    """Box name -> result or exception, in the order the boxes were given."""

    @property
    def succeeded(self) -> dict[str, T]:
        return {k: v for k, v in self.items() if not isinstance(v, BaseException)}

    @property
    def failed(self) -> dict[str, BaseException]:
        return {k: v for k, v in self.items() if isinstance(v, BaseException)}

    def values_or_raise(self) -> list[T]:
        """Every box's result, once all have ended; else the first box's exception (the
        others ran to their end first)."""
        for error in self.failed.values():
            raise error
        return list(self.succeeded.values())


class Group:
    """Boxes that do the same work side by side."""

    def __init__(self, boxes: Sequence[Box]) -> None:
        self.boxes = list(boxes)

    def run(self, work: Callable[[Box], T]) -> GroupResult[T]:
        """`work(box)` for every box, each in its own thread (one box runs in this thread)."""
        outcome: dict[str, T | BaseException] = {}

        def one(box: Box) -> None:
            try:
                outcome[box.name] = work(box)
            except BaseException as e:  # handed to the caller, as Fabric's GroupResult does
                outcome[box.name] = e

        if len(self.boxes) == 1:
            one(self.boxes[0])
        else:
            threads = [threading.Thread(target=one, args=(b,), name=b.name) for b in self.boxes]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        return GroupResult((b.name, outcome[b.name]) for b in self.boxes)
