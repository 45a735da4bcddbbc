"""The pace behind every progress line's rate and ETA (`pipelines.progress.Pace`), on made-up clocks."""

from __future__ import annotations

import io

from pipelines.progress import Pace, Progress


def test_the_pace_starts_at_the_first_result_not_at_the_start() -> None:
    """A job that waited 35 s for its storage, then finished a unit every 0.1 s: 10 units/s, not the
    0.3 units/s an average from the start would say (its ETA was 277 minutes for 3 seconds of work)."""
    pace = Pace()
    assert pace.update(35.0, 1) is None  # one result: no pace yet
    rates = [pace.update(35.0 + 0.1 * i, 1 + i) for i in range(1, 20)]
    assert all(r is not None and abs(r - 10.0) < 1e-6 for r in rates)


def test_the_pace_follows_a_change_of_pace_within_its_window() -> None:
    pace = Pace(window_s=30.0)
    rate = None
    for i in range(600):  # 10 units/s for 60 s
        rate = pace.update(i * 0.1, i + 1)
    assert rate is not None and abs(rate - 10.0) < 1e-6
    for i in range(1, 41):  # then 1 unit/s for 40 s
        rate = pace.update(59.9 + i, 600 + i)
    assert rate is not None and abs(rate - 1.0) < 0.05


def test_a_progress_line_shows_no_eta_before_a_pace_and_the_whole_rate_at_the_end() -> None:
    out = io.StringIO()
    progress = Progress("job", 3, "items", every_s=0.0, out=out)
    progress.update()
    progress.update()
    progress.update()
    first, *_, last = out.getvalue().splitlines()
    assert first.startswith("[job] 1/3 items  -- items/s") and "ETA" not in first
    assert last.startswith("[job] 3/3 items") and "items/s" in last and "ETA 0m00s" in last
