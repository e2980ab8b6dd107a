"""serve.metrics.LoRASlotTimeline: how long a queued request's adapter was shut out of a full batch, from the
engine's scheduled and last-token times (the real server: tests/serve/test_server_e2e.py)."""

from __future__ import annotations

import pytest

from serve.metrics import LoRASlotTimeline

A, B, C = 1, 2, 3


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_third_adapter_waits_while_two_hold_the_slots(clock: Clock) -> None:
    slots = LoRASlotTimeline(max_loras=2, clock=clock)
    a, b, c = slots.submitted(), slots.submitted(), slots.submitted()
    assert slots.scheduled(a, A, queued=0.1, scheduled=0.2) == 0.0
    assert slots.scheduled(b, B, queued=0.1, scheduled=0.3) == 0.0  # one adapter held, a slot free
    clock.now = 4.2
    slots.ended(A, 4.0)
    # Shut out from B's arrival in the batch (0.3) to A's leaving it (4.0), not while it waited before 0.3.
    assert slots.scheduled(c, C, queued=0.1, scheduled=4.1) == pytest.approx(3.7)


def test_an_adapter_already_in_the_batch_is_never_shut_out(clock: Clock) -> None:
    slots = LoRASlotTimeline(max_loras=2, clock=clock)
    a, b, again = slots.submitted(), slots.submitted(), slots.submitted()
    slots.scheduled(a, A, queued=0.1, scheduled=0.1)
    slots.scheduled(b, B, queued=0.1, scheduled=0.1)
    # It waited (for a batch step, KV blocks, ...), but not for a slot: its adapter had one.
    assert slots.scheduled(again, A, queued=0.2, scheduled=2.0) == 0.0


def test_one_slot_serialises_adapters_and_a_wait_counts_only_its_own_span(clock: Clock) -> None:
    slots = LoRASlotTimeline(max_loras=1, clock=clock)
    a, b = slots.submitted(), slots.submitted()
    slots.scheduled(a, A, queued=0.0, scheduled=0.0)
    clock.now = 1.0
    slots.ended(A, 1.0)
    late = slots.submitted()  # queued after A left, while B is in the batch
    assert slots.scheduled(b, B, queued=0.5, scheduled=1.0) == pytest.approx(0.5)
    clock.now = 3.0
    slots.ended(B, 2.5)
    assert slots.scheduled(late, A, queued=1.2, scheduled=2.6) == pytest.approx(1.3)


def test_history_folds_once_no_request_can_look_back(clock: Clock) -> None:
    slots = LoRASlotTimeline(max_loras=2, clock=clock)
    waiting = slots.submitted()
    a = slots.submitted()
    slots.scheduled(a, A, queued=0.0, scheduled=0.1)
    clock.now = 1.0
    slots.ended(A, 0.9)
    assert len(slots.events) == 2  # `waiting` (submitted at 0.0) may still need them
    slots.forget(waiting)  # aborted before it was scheduled
    assert (slots.events, dict(slots.base), slots.horizon) == ([], {}, 1.0)
    # An end stamped before the horizon (its output was read late) still frees the adapter's place.
    b, c = slots.submitted(), slots.submitted()
    slots.scheduled(b, B, queued=1.0, scheduled=1.0)
    slots.scheduled(c, C, queued=1.0, scheduled=1.0)
    clock.now = 2.0
    slots.forget(slots.submitted())
    slots.ended(B, 1.5)  # behind the horizon now: folded into the batch at the horizon
    assert dict(slots.base) == {C: 1}
    d = slots.submitted()
    assert slots.scheduled(d, A, queued=2.1, scheduled=2.2) == 0.0
