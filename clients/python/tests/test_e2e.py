"""The Python client end to end, against a real control plane.

Run by the Rust suite (tests/tests/e2e/clients.rs), which starts the control plane and sets
HERALD_ADDR (host:port) and HERALD_ADMIN_TOKEN; by hand:

    HERALD_ADDR=127.0.0.1:50051 HERALD_ADMIN_TOKEN=hrld_... \
        $(scripts/python-client-env)/bin/python -m pytest clients/python

The receiver is this test's own HTTP server on 127.0.0.1, which checks each webhook the way a
customer's endpoint would.
"""

from __future__ import annotations

import http.server
import json
import os
import queue
import socket
import threading
import time
from typing import Iterator, NamedTuple

import grpc
import pytest

from herald.v1 import (
    admin_pb2,
    common_pb2,
    deliveries_pb2,
    events_pb2,
    subscriptions_pb2,
)
from herald_client import HeraldClient, PublishError, new_idempotency_key
from herald_client import webhooks

ADDR = os.environ.get("HERALD_ADDR", "")
ADMIN_TOKEN = os.environ.get("HERALD_ADMIN_TOKEN", "")
# How long any single wait of this test may take.
DEADLINE_S = 20.0

pytestmark = pytest.mark.skipif(
    not ADDR or not ADMIN_TOKEN, reason="HERALD_ADDR and HERALD_ADMIN_TOKEN are not set"
)


class Request(NamedTuple):
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """An HTTP server on 127.0.0.1 that keeps every request and answers 204."""

    def __init__(self) -> None:
        self.requests: "queue.Queue[Request]" = queue.Queue()
        received = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                received.put(Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/hooks"

    def next(self) -> Request:
        try:
            return self.requests.get(timeout=DEADLINE_S)
        except queue.Empty:
            raise AssertionError(f"no webhook arrived within {DEADLINE_S} s") from None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def tenant() -> Iterator[tuple[str, HeraldClient]]:
    """A tenant made with the admin token; yields its id and a client with its own token."""
    with HeraldClient(ADDR, ADMIN_TOKEN) as admin:
        created = admin.admin.CreateTenant(admin_pb2.CreateTenantRequest(name="acme-python"))
        token = admin.admin.CreateToken(
            admin_pb2.CreateTokenRequest(tenant_id=created.id, name="python backend")
        ).token
    assert token.startswith("hrld_"), token
    with HeraldClient(ADDR, token) as client:
        yield created.id, client


def test_subscribe_publish_deliver_and_retry_with_the_same_key(
    tenant: tuple[str, HeraldClient], receiver: Receiver
) -> None:
    tenant_id, herald = tenant
    sub = herald.subscriptions.CreateSubscription(
        subscriptions_pb2.CreateSubscriptionRequest(
            name="CRM sync",
            url=receiver.url,
            event_types=["user.*"],
            api_key="sk_live_python_1234",
        )
    )
    assert sub.signing_secret.startswith("whsec_"), sub
    assert sub.api_key_hint == "1234"

    key = new_idempotency_key()
    payload = {"entity_type": "user", "entity_id": 42, "action_type": "new", "result": {"id": 42, "name": "Zoë"}}
    published = herald.publish(
        "user.new", payload, idempotency_key=key, entity_type="user", entity_id="42", action="new"
    )
    assert published.event_id and len(published.delivery_ids) == 1, published

    # The delivery, checked as a receiver would: signature, API key, body bytes, webhook-id.
    request = receiver.next()
    assert request.path == "/hooks"
    assert webhooks.verify(sub.signing_secret, request.body, request.headers) == payload
    assert request.headers["webhook-id"] == published.event_id
    assert request.headers["x-api-key"] == "sk_live_python_1234"
    assert request.headers["content-type"] == "application/json"
    tampered = request.body.replace(b"42", b"43")
    with pytest.raises(webhooks.WebhookVerificationError):
        webhooks.verify(sub.signing_secret, tampered, request.headers)

    # A retry with the same key (a publisher that crashed before it saw the reply) returns the
    # same event and creates nothing.
    again = herald.publish(
        "user.new", payload, idempotency_key=key, entity_type="user", entity_id="42", action="new"
    )
    assert again.event_id == published.event_id
    assert list(again.delivery_ids) == list(published.delivery_ids)
    events = herald.idempotent(lambda: herald.events.ListEvents(events_pb2.ListEventsRequest()))
    assert [e.id for e in events.events] == [published.event_id]
    assert events.events[0].idempotency_key == key

    # The same key with another event is a caller's bug: ALREADY_EXISTS, not to be retried.
    with pytest.raises(PublishError) as refused:
        herald.publish("user.new", {"other": True}, idempotency_key=key)
    assert refused.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert not refused.value.retry_later
    assert refused.value.idempotency_key == key

    # The delivery log agrees, once the agent's result is recorded.
    deadline = time.monotonic() + DEADLINE_S
    while True:
        delivery = herald.deliveries.GetDelivery(
            deliveries_pb2.GetDeliveryRequest(id=published.delivery_ids[0])
        )
        if delivery.state == common_pb2.DELIVERY_STATE_SUCCEEDED:
            break
        assert time.monotonic() < deadline, f"delivery not SUCCEEDED: {delivery}"
        time.sleep(0.05)
    assert delivery.webhook_id == published.event_id
    assert [a.status_code for a in delivery.attempts] == [204]

    # A second event without a key of its own gets one, and is a different event.
    other = herald.publish("user.deleted", {"entity_id": 42}, entity_type="user", entity_id="42")
    assert other.event_id != published.event_id
    second = receiver.next()
    assert second.headers["webhook-id"] == other.event_id
    assert webhooks.verify(sub.signing_secret, second.body, second.headers) == {"entity_id": 42}

    # For the Rust side of the test, which checks the same through its own client.
    result_file = os.environ.get("HERALD_RESULT_FILE")
    if result_file:
        with open(result_file, "w", encoding="utf-8") as out:
            json.dump(
                {
                    "tenant_id": tenant_id,
                    "subscription_id": sub.id,
                    "event_id": published.event_id,
                    "idempotency_key": key,
                },
                out,
            )


def test_every_call_carries_a_deadline() -> None:
    # A peer on 127.0.0.1 that accepts connections and never answers: only a deadline ends a
    # call to it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        addr = "127.0.0.1:%d" % silent.getsockname()[1]
        with HeraldClient(addr, "hrld_x", timeout=0.3) as herald:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as by_default:
                herald.events.ListEvents(events_pb2.ListEventsRequest())
            assert by_default.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert 0.25 <= time.monotonic() - started < 5

            # A call's own timeout= wins over the client's.
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as by_call:
                herald.events.ListEvents(events_pb2.ListEventsRequest(), timeout=0.1)
            assert by_call.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 0.25

            # DEADLINE_EXCEEDED on a publish: the outcome is unknown, so retry later, same key.
            with pytest.raises(PublishError) as publish_late:
                herald.publish("user.new", {"id": 1}, idempotency_key="idem_late")
            assert publish_late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert publish_late.value.retry_later
            assert publish_late.value.idempotency_key == "idem_late"


def test_a_wrong_token_is_refused_and_not_retried() -> None:
    with HeraldClient(ADDR, "hrld_not_a_token") as stranger:
        calls = 0

        def list_events() -> events_pb2.ListEventsResponse:
            nonlocal calls
            calls += 1
            return stranger.events.ListEvents(events_pb2.ListEventsRequest())

        with pytest.raises(grpc.RpcError) as refused:
            stranger.idempotent(list_events)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert calls == 1


def test_unavailable_is_retried_with_backoff_then_reported() -> None:
    # A port on 127.0.0.1 that nothing listens on: every attempt fails with UNAVAILABLE.
    with HeraldClient(f"127.0.0.1:{closed_port()}", "hrld_x", max_attempts=3, timeout=5) as down:
        calls = 0

        def list_events() -> events_pb2.ListEventsResponse:
            nonlocal calls
            calls += 1
            return down.events.ListEvents(events_pb2.ListEventsRequest())

        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as unavailable:
            down.idempotent(list_events)
        waited = time.monotonic() - started
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
        assert calls == 3
        # Two backoffs: 100 ms and 200 ms, each -20% at worst.
        assert waited >= 0.24, waited
        with pytest.raises(PublishError) as failed:
            down.publish("user.new", {"id": 1})
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
        assert failed.value.retry_later
        assert str(failed.value.idempotency_key).startswith("idem_")


def closed_port() -> int:
    """A port on 127.0.0.1 that was bound a moment ago and is closed now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
