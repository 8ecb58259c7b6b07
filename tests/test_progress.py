"""tinyddpm/progress.py: a log gets a line at the start, every `every` seconds, and at the end."""
import io

from tinyddpm.progress import ProgressLines, duration, progress_for


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_log_gets_a_line_at_the_start_then_every_interval_and_at_the_end():
    out, clock = io.StringIO(), Clock()
    progress = ProgressLines(100, "sampling", out, every=30, clock=clock)
    assert out.getvalue() == "", "nothing before the work starts (a command may still fail first)"
    for _ in range(100):
        progress()
        clock.now += 1                      # one unit a second: a line at 30, 60 and 90 s
    progress.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["31/100", "61/100", "91/100", "100/100"]
    assert lines[-1] == "sampling: 100/100 (100%)  1.0/s  elapsed 1m40s"
    assert lines[1] == "sampling: 61/100 (61%)  1.0/s  elapsed 1m00s  eta 0m38s"


def test_a_short_job_stays_silent_and_an_unknown_total_is_a_count():
    out, clock = io.StringIO(), Clock()
    progress = ProgressLines(None, "sampling", out, every=30, clock=clock)
    for _ in range(5):
        progress()
        clock.now += 1
    progress.close()
    assert out.getvalue() == ""
    progress = ProgressLines(None, "sampling", out, every=2, clock=clock)
    for _ in range(3):
        progress()
        clock.now += 1
    progress.close()
    progress.close()                        # nothing done since the last line: no end line
    assert out.getvalue().splitlines() == ["sampling: 3  1.5/s  elapsed 0m02s"]


def test_a_terminal_gets_a_bar_and_a_file_gets_lines():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    assert not isinstance(progress_for(10, "x", Terminal()), ProgressLines)
    assert isinstance(progress_for(10, "x", io.StringIO()), ProgressLines)


def test_durations_read_as_minutes_and_seconds_or_hours_and_minutes():
    assert [duration(s) for s in (0, 61, 3599, 3600, 7322)] == ["0m00s", "1m01s", "59m59s", "1h00m", "2h02m"]
