"""Progress lines in tests, without wall-clock assertions: :func:`heartbeat` makes every progress
line due at once (``runtime.PROGRESS_INTERVAL_S`` tiny) and records stderr, and a fake slow step
waits (:meth:`Lines.wait_for`) until the line it expects has been printed -- which happens only if
the heartbeat thread runs while the step does."""

from __future__ import annotations

import sys
import threading


class Lines:
    """A stand-in for ``sys.stderr`` (not a terminal) that records what is written."""

    def __init__(self) -> None:
        self.text = ""
        self._changed = threading.Condition()

    def write(self, text: str) -> int:
        with self._changed:
            self.text += text
            self._changed.notify_all()
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def lines(self, prefix: str = "") -> list[str]:
        return [line for line in self.text.splitlines() if line.startswith(prefix)]

    def wait_for(self, text: str, timeout: float = 300.0) -> None:
        """Block until a line holding ``text`` is written. ``timeout`` only guards against a hang
        (the heartbeat never firing): it fails the test, it measures nothing."""
        with self._changed:
            if not self._changed.wait_for(lambda: text in self.text, timeout):
                raise AssertionError(f"no line with {text!r} printed; stderr ends {self.text[-1500:]!r}")


def heartbeat(monkeypatch, interval: float = 0.001) -> Lines:
    """Progress lines every ``interval`` seconds (every Watch poll prints), recorded; returns the record."""
    from pacl_ray.stages import runtime

    lines = Lines()
    monkeypatch.setattr(runtime, "PROGRESS_INTERVAL_S", interval)
    monkeypatch.setattr(sys, "stderr", lines)
    return lines


def quiet(monkeypatch) -> Lines:
    """No progress line is due within a test (an hour's interval): what a short step prints."""
    return heartbeat(monkeypatch, interval=3600.0)
