"""A small run of bench/browser_start.py: one session on each dispatcher, in a real browser."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.browser_start import measure, report
from testkit.browser import require_chromium

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]


async def test_one_session_each_is_measured_and_reported(tmp_path: Path) -> None:
    """A cold and a pooled session: each got its bot ready and heard it, the
    pooled one from the pool, and the report has both rows and the ratio of the medians."""
    require_chromium()
    runs = await measure(1, tmp_path)
    for run in runs.values():
        assert len(run.ready_s) == len(run.audio_s) == 1
        assert run.ready_s[0] > 0 and run.audio_s[0] > 0
    assert (runs["pooled"].claims, runs["pooled"].misses) == (1, 0)
    text = report(runs, ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)))
    assert "| cold (POOL_SIZE=0) | 1 |" in text
    assert "| pooled (POOL_SIZE=1) | 1 |" in text
    assert "cold / pooled, p50: bot ready" in text
