"""The ask path's parts: the bounded Mailbox and the ReplyFuture an ask waits on."""

from __future__ import annotations

import queue
import threading
from typing import Any

import pykka
import pytest
from pykka import ActorDeadError

from corral._runtime import PROBE, ActorStop, Envelope, Mailbox, ReplyFuture
from corral.errors import ManagerUnavailable, Overloaded
from corral.messages.system import Ping


def envelopes(*messages: Any) -> list[Envelope[Any]]:
    return [Envelope(message) for message in messages]


def taken(mailbox: Mailbox, count: int) -> list[Any]:
    return [mailbox.get().message for _ in range(count)]


# -- ReplyFuture ------------------------------------------------------------------------------


def test_a_reply_future_gives_its_value_to_every_get() -> None:
    future = ReplyFuture()
    future.set("pong")
    assert future.get() == "pong"
    assert future.get(timeout=0) == "pong"


def test_a_reply_future_raises_the_error_it_was_set_with() -> None:
    future = ReplyFuture()
    error = ManagerUnavailable("down")
    future.set_exception((ManagerUnavailable, error, None))
    for _ in range(2):
        with pytest.raises(ManagerUnavailable) as caught:
            future.get()
        assert caught.value is error


def test_a_reply_future_without_a_reply_times_out_as_pykka_says() -> None:
    with pytest.raises(pykka.Timeout):
        ReplyFuture().get(timeout=0.01)
    with pytest.raises(pykka.Timeout):
        ReplyFuture().get(timeout=-1)  # a deadline already past


def test_a_reply_future_is_set_once() -> None:
    future = ReplyFuture()
    future.set(1)
    with pytest.raises(queue.Full):
        future.set(2)
    with pytest.raises(queue.Full):
        future.set_exception((ValueError, ValueError("late"), None))
    assert future.get() == 1


def test_a_reply_set_on_another_thread_wakes_the_waiting_get() -> None:
    future = ReplyFuture()
    waiting = threading.Event()

    def reply() -> None:
        waiting.wait(5)
        future.set("from the actor")

    thread = threading.Thread(target=reply)
    thread.start()
    waiting.set()
    assert future.get(timeout=10) == "from the actor"
    thread.join(5)


# -- Mailbox ----------------------------------------------------------------------------------


def test_envelopes_come_out_in_order_and_probes_first() -> None:
    mailbox = Mailbox(capacity=10, put_timeout=1.0, owner="m")
    for envelope in envelopes("a", "b"):
        mailbox.put(envelope)
    mailbox.put(Envelope(PROBE))
    assert mailbox.qsize() == 3 and not mailbox.empty()
    assert taken(mailbox, 3) == [PROBE, "a", "b"]
    assert mailbox.empty()


def test_what_take_head_took_is_not_given_again() -> None:
    mailbox = Mailbox(capacity=10, put_timeout=1.0, owner="m")
    for envelope in envelopes(Ping(), Ping(), "other"):
        mailbox.put(envelope)
    assert [e.message for e in mailbox.take_head(Ping, 5)] == [Ping(), Ping()]
    mailbox.put(Envelope("last"))
    assert taken(mailbox, 2) == ["other", "last"]
    assert mailbox.empty()


def test_requeued_envelopes_go_ahead_of_those_waiting() -> None:
    mailbox = Mailbox(capacity=10, put_timeout=1.0, owner="m")
    mailbox.put(Envelope("new"))
    assert mailbox.requeue(envelopes("old 1", "old 2"))
    assert taken(mailbox, 3) == ["old 1", "old 2", "new"]


def test_a_full_mailbox_refuses_try_put_and_overloads_put_but_takes_stops_and_probes() -> None:
    mailbox = Mailbox(capacity=1, put_timeout=0.01, owner="m")
    assert mailbox.try_put(Envelope("first"))
    assert not mailbox.try_put(Envelope("second"))
    with pytest.raises(Overloaded):
        mailbox.put(Envelope("second"))
    assert mailbox.metrics.overloaded == 1
    mailbox.put(Envelope(PROBE))
    mailbox.put(Envelope(ActorStop()))
    messages = taken(mailbox, 3)
    assert messages[:2] == [PROBE, "first"]
    assert isinstance(messages[2], ActorStop)


def test_a_put_waiting_for_room_goes_in_when_the_actor_takes_one() -> None:
    mailbox = Mailbox(capacity=1, put_timeout=30.0, owner="m")
    mailbox.put(Envelope("first"))
    done = threading.Event()

    def blocked_put() -> None:
        mailbox.put(Envelope("second"))
        done.set()

    thread = threading.Thread(target=blocked_put)
    thread.start()
    assert taken(mailbox, 1) == ["first"]
    assert done.wait(10)
    assert taken(mailbox, 1) == ["second"]
    thread.join(5)


def test_a_drained_mailbox_refuses_everything() -> None:
    mailbox = Mailbox(capacity=10, put_timeout=1.0, owner="m")
    mailbox.put(Envelope(PROBE))
    mailbox.put(Envelope("a"))
    assert [e.message for e in mailbox.drain()] == [PROBE, "a"]
    with pytest.raises(ActorDeadError):
        mailbox.put(Envelope("late"))
    assert not mailbox.try_put(Envelope("late"))
    assert not mailbox.requeue(envelopes("late"))
    assert mailbox.qsize() == 0
