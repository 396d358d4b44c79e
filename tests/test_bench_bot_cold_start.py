"""A small run of bench/bot_cold_start.py: every case runs the real processes and is reported."""

from __future__ import annotations

import pytest

from bench.bot_cold_start import EXAMPLE, measure, report


@pytest.mark.slow
@pytest.mark.timeout(600)  # six cold starts of a Pipecat bot: minutes on a loaded machine
async def test_one_round_of_every_case_is_measured_and_reported() -> None:
    """One measured round: each case took some time, and the report has a line for each, with
    its time over the bot file's own imports."""
    results = await measure(1, EXAMPLE)
    assert len(results) == 6
    assert all(len(values) == 1 and values[0] > 0 for values in results.values())
    text = report(results, 1, EXAMPLE)
    lines = text.splitlines()
    assert lines[0].startswith("bot cold start of examples/bot/bot.py")
    assert [line.split("  ")[0] for line in lines[2:]] == list(results)
    assert "+0ms  1.00x" in lines[3]
