"""A work queue over a fixed set of Ray actors that replaces the actors that die.

The whole-model backend and the block-by-block backend hand out work the same way. An idle actor
takes the next item, and a finished item goes to a callback on the driver. When an actor dies,
the backend replaces it and its item is queued again. A task that raised ends the run: a rayq
error keeps its own message, and any other becomes a `RunFailedError` naming the worker.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable

from rayq.errors import RayqError, RunFailedError


def dispatch(slots: list, items: Iterable, submit: Callable[[Any, Any], tuple[Any, Any]],
             on_result: Callable[[int, Any, Any, Any], None],
             replace: Callable[[int, Any, Exception], None],
             describe: Callable[[Any], str]) -> None:
    """Run every item on the actors in `slots` until each has a result.

    `submit(actor, item)` starts an item and returns (the reference whose value is its result,
    anything to hand back with it). `on_result(slot, item, result, extra)` receives each result.
    `replace(slot, item, exc)` puts a new actor into `slots[slot]` or raises once the slot is out
    of restarts. `describe(item)` names the item in the error of a failed task.
    """
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    pending = deque(items)
    idle = deque(range(len(slots)))
    in_flight: dict[Any, tuple[int, Any, Any]] = {}
    while pending or in_flight:
        while idle and pending:
            slot = idle.popleft()
            item = pending.popleft()
            ref, extra = submit(slots[slot], item)
            in_flight[ref] = (slot, item, extra)
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        slot, item, extra = in_flight.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except RayActorError as exc:
            replace(slot, item, exc)
            pending.appendleft(item)
        except RayTaskError as exc:
            if isinstance(getattr(exc, "cause", None), RayqError):
                raise exc.cause from None
            raise RunFailedError(f"worker {slot} failed on {describe(item)}: {exc}") from exc
        else:
            on_result(slot, item, result, extra)
        idle.append(slot)
