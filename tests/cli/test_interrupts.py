"""interrupts_kept: a Ctrl-C that library code swallows on the way up is raised again when the block ends."""
from __future__ import annotations

import os
import signal
import time

import pytest

from moekit.cli.errors import interrupts_kept


def _sigint_and_swallow() -> None:
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs here and raises
        raise AssertionError("SIGINT was not delivered")
    except KeyboardInterrupt:
        pass  # what a finalizer or an error-ignoring callback does


def test_a_swallowed_interrupt_is_raised_again_at_the_end_of_the_block():
    before = signal.getsignal(signal.SIGINT)
    after_swallow = []
    with pytest.raises(KeyboardInterrupt), interrupts_kept():
        _sigint_and_swallow()
        after_swallow.append(True)
    assert after_swallow == [True]  # the work went on; the interrupt came back at the block's end
    assert signal.getsignal(signal.SIGINT) is before


def test_without_an_interrupt_the_block_is_transparent():
    before = signal.getsignal(signal.SIGINT)
    with interrupts_kept():
        x = 1
    assert x == 1 and signal.getsignal(signal.SIGINT) is before


def test_outside_the_main_thread_it_changes_nothing():
    import threading

    seen = []

    def body():
        with interrupts_kept():
            seen.append(signal.getsignal(signal.SIGINT))

    th = threading.Thread(target=body)
    th.start()
    th.join(10)
    assert seen == [signal.getsignal(signal.SIGINT)]
