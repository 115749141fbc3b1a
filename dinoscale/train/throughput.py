"""Speed over a window of recent iterations: one step's images/s swings with the data loader, the
other processes on the machine and the checkpoints, so the log shows the window's."""

from __future__ import annotations

from collections import deque


class ThroughputWindow:
    """Images/s, MFU and the share of the step time spent waiting for data, over the last `size`
    iterations: totals of the window divided by its wall time (not a mean of per-step rates)."""

    def __init__(self, size: int):
        self.size = size
        self._steps: deque[tuple[int, float, float, float]] = deque(maxlen=size)

    def add(self, images: int, seconds: float, data_seconds: float, flops: float, peak_flops: float) -> dict[str, float]:
        """Record one iteration; returns the window's figures as metrics."""
        self._steps.append((images, seconds, data_seconds, flops))
        images_sum, seconds_sum, data_sum, flops_sum = (sum(column) for column in zip(*self._steps))
        return {"images_per_s_window": images_sum / seconds_sum, "mfu_window": flops_sum / seconds_sum / peak_flops,
                "data_wait_share_window": data_sum / seconds_sum, "window_iterations": len(self._steps)}
