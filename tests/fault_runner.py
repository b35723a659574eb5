"""Run the `tp-loraprune` CLI with a fault injected (tests/test_faults.py starts it as a subprocess).

    python tests/fault_runner.py <fault> <n> <cli args...>

kills the process with SIGKILL (no cleanup, like `kill -9` or the OOM killer) at the n-th time the
point named by <fault> is reached; "none" runs the CLI unchanged.
"""

from __future__ import annotations

import os
import signal
import sys

from tp_loraprune import checkpoint, cli, export


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _on_call(module, name: str, n: int, *, after: bool = False) -> None:
    """Kill at the n-th call of module.name (before it runs, or right after it returned)."""
    original, calls = getattr(module, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and not after:
            _kill()
        result = original(*args, **kwargs)
        if calls[0] == n and after:
            _kill()
        return result

    setattr(module, name, wrapper)


FAULTS = {
    "before_checkpoint": lambda n: _on_call(checkpoint, "save_checkpoint", n),
    "during_checkpoint": lambda n: _on_call(checkpoint, "records", n),  # tensors written, state.json not yet
    "before_publish": lambda n: _on_call(checkpoint, "_publish", n),  # new dir in place, latest.json not moved
    "after_checkpoint": lambda n: _on_call(checkpoint, "save_checkpoint", n, after=True),
    "during_save": lambda n: _on_call(export, "_write_marker", n),  # every file written but the marker
    "after_save": lambda n: _on_call(cli, "_remove_checkpoints", n),  # model saved, checkpoints not removed
    "none": lambda n: None,
}

if __name__ == "__main__":
    fault, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    FAULTS[fault](n)
    sys.exit(cli.main(argv))
