"""The optional clock of the training loop and the relocator (no-op by default).

``clock.batch(phase)`` wraps a per-batch phase (``data``, ``forward_backward``, ``optimizer``),
``clock.once(phase)`` a once-per-epoch one (``scoring``, ``act``, ``ppo_update``, ...), and
``clock.mark(event)`` flags a moment (``forward``: activations at their peak). The timing study
passes a clock that measures them; training passes none and pays nothing.
"""

from __future__ import annotations

from contextlib import nullcontext


class NullClock:
    def batch(self, phase: str):
        return nullcontext()

    def once(self, phase: str):
        return nullcontext()

    def mark(self, event: str) -> None:
        pass


NULL_CLOCK = NullClock()
