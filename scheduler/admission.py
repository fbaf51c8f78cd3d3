"""AdmissionQueue: requests waiting for a worker with room, bounded so that overload is
answered at once (RESOURCE_EXHAUSTED) instead of by a growing wait."""

from __future__ import annotations

from collections import Counter, OrderedDict

from inflight.schema import Submit


class AdmissionQueue:
    def __init__(self, max_queued: int):
        self.max_queued = max_queued
        self._items: OrderedDict[str, Submit] = OrderedDict()
        self._per_model: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._items)

    def waiting_for(self, model: str) -> int:
        """Requests for `model` in the queue."""
        return self._per_model[model]

    def offer(self, submit: Submit) -> bool:
        """Queue the request; False when the queue is full."""
        if len(self._items) >= self.max_queued:
            return False
        self._items[submit.request_id] = submit
        self._per_model[submit.model] += 1
        return True

    def readmit(self, submit: Submit) -> None:
        """Put a request already admitted back at the head of the queue (its worker died
        and no other has room): it was let in once, so the bound does not apply."""
        if submit.request_id not in self._items:
            self._per_model[submit.model] += 1
        self._items[submit.request_id] = submit
        self._items.move_to_end(submit.request_id, last=False)

    def remove(self, request_id: str) -> Submit | None:
        submit = self._items.pop(request_id, None)
        if submit is not None:
            self._per_model[submit.model] -= 1
        return submit

    def waiting(self) -> list[Submit]:
        """Oldest first."""
        return list(self._items.values())

    def expired(self, now: float) -> list[Submit]:
        gone = [s for s in self._items.values() if s.deadline is not None and s.deadline <= now]
        for s in gone:
            self.remove(s.request_id)
        return gone
