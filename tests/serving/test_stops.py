"""The stop channel's rules without a server: whose stop counts, and when it polls.
(tests/test_local_endpoint.py stops real jobs through the runpod SDK's job loop.)"""

from __future__ import annotations

import queue
import time

import pytest

from src.serving.stops import POLL_FLOOR_S, JobStopped, StopChannel


class LongPoll:
    """A channel that answers each poll with the next list put in, as a held request would."""

    def __init__(self):
        self.answers: queue.Queue[list[str]] = queue.Queue()
        self.polls = 0

    def __call__(self) -> list[str]:
        self.polls += 1
        return self.answers.get()


def eventually(condition, within_s: float = 5 * POLL_FLOOR_S) -> bool:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def raises_stopped(check) -> bool:
    try:
        check()
    except JobStopped:
        return True
    return False


def test_only_a_stop_naming_the_running_job_stops_it():
    channel_poll = LongPoll()
    channel = StopChannel(channel_poll)
    with channel.watching("job-a") as check:
        assert eventually(lambda: channel_poll.polls == 1)
        channel_poll.answers.put(["job-b"])
        assert eventually(lambda: channel_poll.polls == 2)
        assert not raises_stopped(check)
        channel_poll.answers.put(["job-b", "job-a"])
        assert eventually(lambda: raises_stopped(check))
        with pytest.raises(JobStopped, match="stopped: the endpoint cancelled this job or its time ran out"):
            check()
    # The next job starts unstopped, though the last answer named the one before.
    with channel.watching("job-c") as check:
        assert not raises_stopped(check)
        channel_poll.answers.put([])


def test_the_channel_is_polled_only_while_a_job_runs():
    channel_poll = LongPoll()
    channel = StopChannel(channel_poll)
    with channel.watching("job-a"):
        assert eventually(lambda: channel_poll.polls == 1)
    channel_poll.answers.put([])  # the poll held when the job ended comes back
    time.sleep(3 * POLL_FLOOR_S)
    assert channel_poll.polls == 1
    with channel.watching("job-b"):
        assert eventually(lambda: channel_poll.polls == 2)
        channel_poll.answers.put([])


def test_failed_polls_back_off_and_warn_once(caplog):
    class Refusing:
        polls = 0

        def __call__(self):
            self.polls += 1
            raise ConnectionError("http://secret-host/job-stop/worker?token=x")

    refusing = Refusing()
    channel = StopChannel(refusing)
    started = time.monotonic()
    with caplog.at_level("DEBUG", logger="src.serving.stops"):
        with channel.watching("job-a") as check:
            assert eventually(lambda: refusing.polls == 3, within_s=10 * POLL_FLOOR_S)
            waited_s = time.monotonic() - started
            check()  # the job runs on
    assert waited_s >= 3 * POLL_FLOOR_S  # 1 floor after the first failure, 2 after the second
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warnings == [f"stop channel: poll failed (ConnectionError); retrying in {POLL_FLOOR_S:g} s"]
    assert "secret-host" not in caplog.text
