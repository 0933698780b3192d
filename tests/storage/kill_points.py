"""Kill points for the fault-injection child processes: a writer SIGKILLs itself at its k-th durable step."""

import os
import signal


class KillPoint:
    """Counts calls through the functions it wraps; the `kill_at`-th call SIGKILLs the process before it runs
    (0: never). `calls` is the number of durable steps taken so far."""

    def __init__(self, kill_at: int):
        self.kill_at, self.calls = kill_at, 0

    def wrap(self, real):
        def wrapped(*args, **kwargs):
            self.calls += 1
            if self.calls == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return wrapped
