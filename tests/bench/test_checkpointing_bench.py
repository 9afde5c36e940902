"""bench/checkpointing.py: medians and ratios over the finished repeats, written after every repeat."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import checkpointing  # noqa: E402


def test_the_result_is_written_after_every_repeat_with_medians_of_what_finished(monkeypatch):
    measured = {("off", 0): (60.0, 5000.0, 4000.0), ("on", 0): (70.0, 2500.0, 1500.0),
                ("off", 1): (64.0, 5200.0, 4100.0), ("on", 1): (75.0, 2300.0, 1400.0),
                ("off", 2): (61.0, 5100.0, 4300.0), ("on", 2): (90.0, 2400.0, 1600.0)}
    calls: list[str] = []

    def fake_child(cmd, **kwargs):
        mode = cmd[cmd.index("--child") + 1]
        repeat = sum(1 for c in calls if c == mode)
        calls.append(mode)
        step, peak, above = measured[(mode, repeat)]
        out = {"checkpointing": mode == "on", "rss_before_mb": peak - above, "peak_rss_mb": peak,
               "peak_above_start_mb": above, "step_seconds": [step], "warmup_seconds": [],
               "step_usage": [{"user_seconds": step - 2, "system_seconds": 2.0 + repeat, "minor_page_faults": int(above) * 10}]}
        return type("Done", (), {"returncode": 0, "stdout": "log line\n" + json.dumps(out) + "\n", "stderr": ""})()

    written: list[tuple[dict, str]] = []
    monkeypatch.setattr(checkpointing.subprocess, "run", fake_child)
    monkeypatch.setattr(checkpointing, "write_result", lambda name, figures, status: written.append((json.loads(json.dumps(figures)), status)))
    monkeypatch.setattr(sys, "argv", ["checkpointing.py", "--repeats", "3"])
    checkpointing.main()

    assert calls == ["off", "on"] * 3  # interleaved
    assert [status for _, status in written] == ["partial", "partial", "ok"]
    for done, (figures, _) in enumerate(written, start=1):
        assert figures["repeats_done"] == done and len(figures["runs"]) == 2 * done
        for mode in ("off", "on"):
            mine = [measured[(mode, r)] for r in range(done)]
            assert figures[mode]["step_seconds_median"] == statistics.median(m[0] for m in mine)
            assert figures[mode]["peak_rss_mb_median"] == statistics.median(m[1] for m in mine)
            assert figures[mode]["peak_above_start_mb_median"] == statistics.median(m[2] for m in mine)
            assert figures[mode]["user_seconds_median"] == statistics.median(m[0] - 2 for m in mine)
            assert figures[mode]["system_seconds_median"] == statistics.median(2.0 + r for r in range(done))
            assert figures[mode]["minor_page_faults_median"] == statistics.median(int(m[2]) * 10 for m in mine)
        ratios = figures["ratios"]
        assert ratios["step_time"] == figures["on"]["step_seconds_median"] / figures["off"]["step_seconds_median"]
        assert ratios["peak_above_start"] == figures["on"]["peak_above_start_mb_median"] / figures["off"]["peak_above_start_mb_median"]
