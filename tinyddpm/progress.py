"""Progress for long commands: a tqdm bar on a terminal, a plain line now and then in a log.

    progress = progress_for(total, "sampling")      # call progress() once per unit of work
    ...
    progress.close()

A log file (stdout or stderr not a terminal) gets a line whenever `every`
seconds have passed, and one at the end if it got any before (a short job
stays silent), so that a log of a run that takes hours shows it is alive
without filling up:

    sampling: 3400/10000 (34%)  5.4/s  elapsed 10m29s  eta 20m22s
"""
import sys
import time


def duration(seconds):
    """12m05s, or 1h02m past an hour."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class ProgressLines:
    """A callable counting units of work, writing a line now and then (see the module doc)."""

    def __init__(self, total, label, stream=None, every=30.0, clock=time.monotonic):
        self.total, self.label, self.every, self.clock = total, label, every, clock
        self.stream = stream if stream is not None else sys.stderr
        self.done, self.start = 0, clock()
        self.last, self.reported = self.start, None

    def __call__(self, n=1):
        if self.done == 0 and self.reported is None:      # the clock starts with the work
            self.start = self.last = self.clock()
        self.done += n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self._write()

    def close(self):
        if self.reported is not None and self.done != self.reported:
            self._write()

    def _write(self):
        self.reported = self.done
        elapsed = self.clock() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        line = f"{self.label}: {self.done}" + (f"/{self.total}" if self.total else "")
        if self.total:
            line += f" ({100 * self.done / self.total:.0f}%)"
        if self.done:
            line += f"  {rate:.1f}/s  elapsed {duration(elapsed)}"
            if self.total and rate > 0 and self.done < self.total:
                line += f"  eta {duration((self.total - self.done) / rate)}"
        self.stream.write(line + "\n")
        self.stream.flush()


class _Bar:
    """tqdm's bar behind the same interface."""

    def __init__(self, total, label, stream):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=label, unit="step", file=stream, dynamic_ncols=True)

    def __call__(self, n=1):
        self.bar.update(n)

    def close(self):
        self.bar.close()


def progress_for(total, label, stream=None, every=30.0):
    """A bar on a terminal, ProgressLines elsewhere; call it per unit of work, close() at the end."""
    stream = stream if stream is not None else sys.stderr
    if stream.isatty():
        return _Bar(total, label, stream)
    return ProgressLines(total, label, stream, every=every)
