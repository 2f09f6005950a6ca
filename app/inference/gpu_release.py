"""When the inference engine gives the GPU back to a training job, and when it takes it again.

The worker trains on the same GPU as the API serves from; with `release_gpu_during_training` the
engine drops its model while a job runs and reloads it once none has run for a cool-down. This
policy only decides; the engine releases and reloads. Whether a job runs comes from an injected
probe (the app wires one that reads the job table through app.queue), so inference needs no database.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

log = logging.getLogger(__name__)

TrainingProbe = Callable[[], bool]  # True while a training job runs
Action = Literal["release", "reload"]


class GpuReleasePolicy:
    """Asks `probe` at most every `poll_s`: "release" when a job runs while the model is loaded,
    "reload" once no job has run for `cooldown_s` while it is released, else nothing."""

    def __init__(
        self,
        probe: TrainingProbe,
        *,
        poll_s: float,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.poll_s = poll_s
        self.cooldown_s = cooldown_s
        self._probe = probe
        self._clock = clock
        self._next_probe = 0.0
        self._idle_since: float | None = None  # when the probe first saw no running job, while released

    def decide(self, *, released: bool) -> Action | None:
        now = self._clock()
        if now < self._next_probe:
            return None
        self._next_probe = now + self.poll_s
        try:
            training = self._probe()
        except Exception:  # a database hiccup must not stop generation; look again next time
            log.exception("could not find out whether a training job runs")
            return None
        if training:
            self._idle_since = None
            return None if released else "release"
        if released and self._cooled_down(now):
            return "reload"
        return None

    def _cooled_down(self, now: float) -> bool:
        """Between two queued jobs the worker takes a moment to claim the next one; reloading in that
        gap would only be released again at once."""
        if self._idle_since is None:
            self._idle_since = now
        return now - self._idle_since >= self.cooldown_s
