"""The client: bearer token and a deadline on every call, retries of idempotent calls."""

from __future__ import annotations

import json
import random
import time
import uuid
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, TypeVar, Union

import grpc

from herald.v1 import (
    admin_pb2_grpc,
    deliveries_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    subscriptions_pb2_grpc,
)

T = TypeVar("T")

Payload = Union[str, bytes, Mapping[str, Any]]

# The only status after which Herald guarantees that a call may simply be sent again: the
# storage was down or the replica is stopping, and for a publish the commit outcome is unknown
# (SPEC: "safe to retry with the same idempotency key"). Everything else is either final
# (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, ...) or needs a decision by the caller.
RETRIED_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})


def new_idempotency_key() -> str:
    """A fresh idempotency key, as the Rust client makes them (`idem_` + 32 hex digits)."""
    return "idem_" + uuid.uuid4().hex


class PublishError(Exception):
    """A publish that failed; `idempotency_key` is the key to send again with the same event."""

    def __init__(self, error: grpc.RpcError, idempotency_key: Union[str, Sequence[str]]):
        self.code: grpc.StatusCode = error.code()
        self.details: str = error.details() or ""
        self.idempotency_key = idempotency_key
        super().__init__(f"{self.code.name}: {self.details}")

    @property
    def retry_later(self) -> bool:
        """True when the same event may be published again later with the same key.

        UNAVAILABLE (already retried here; the control plane is down or stopping) and
        DEADLINE_EXCEEDED (the outcome is unknown) may have been committed, and "storage full"
        (RESOURCE_EXHAUSTED) was not: resending with the same key is safe in each case, and
        creates nothing twice. Other RESOURCE_EXHAUSTED (payload too large, throttled
        authentication) and every other code will fail the same way again.
        """
        if self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return True
        return self.code == grpc.StatusCode.RESOURCE_EXHAUSTED and self.details.startswith(
            "storage full"
        )


class _CallDetails(NamedTuple):
    method: str
    timeout: Optional[float]
    metadata: Optional[Sequence[tuple[str, Union[str, bytes]]]]
    credentials: Optional[grpc.CallCredentials]
    wait_for_ready: Optional[bool]
    compression: Optional[grpc.Compression]


class _Defaults(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call and a deadline to unary ones.

    An interceptor rather than call credentials: gRPC refuses call credentials on plaintext
    channels, and Herald on 127.0.0.1 is plaintext by default.
    """

    def __init__(self, token: str, timeout: float):
        self._auth = ("authorization", f"Bearer {token}")
        self._timeout = timeout

    def _details(self, details: grpc.ClientCallDetails, timeout: Optional[float]) -> _CallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"]
        metadata.append(self._auth)
        return _CallDetails(
            details.method,
            timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        timeout = client_call_details.timeout
        return continuation(
            self._details(client_call_details, self._timeout if timeout is None else timeout),
            request,
        )

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        # A stream (WatchDeliveries) lives as long as the caller wants: no default deadline.
        return continuation(self._details(client_call_details, client_call_details.timeout), request)


class HeraldClient:
    """A client of one control plane.

    `admin`, `subscriptions`, `events` and `deliveries` are the generated stubs of the four
    services, on a channel that sends the token and a deadline (`timeout` seconds unless the
    call passes its own `timeout=`) with every call. `publish` and `publish_many` add an
    idempotency key and retry; `idempotent` retries any other call that is safe to repeat.
    """

    def __init__(
        self,
        target: str,
        token: str,
        *,
        timeout: float = 30.0,
        max_attempts: int = 4,
        credentials: Optional[grpc.ChannelCredentials] = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """`target` is `host:port` (`127.0.0.1:50051`); `credentials` turns TLS on
        (`grpc.ssl_channel_credentials(root_certificates=...)`), plaintext without."""
        if max_attempts < 1:
            raise ValueError("max_attempts: at least 1")
        options = [("grpc.max_receive_message_length", 64 << 20), *options]
        if credentials is None:
            raw = grpc.insecure_channel(target, options=options)
        else:
            raw = grpc.secure_channel(target, credentials, options=options)
        self._raw = raw
        self.channel = grpc.intercept_channel(raw, _Defaults(token, timeout))
        self.max_attempts = max_attempts
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.subscriptions = subscriptions_pb2_grpc.SubscriptionServiceStub(self.channel)
        self.events = events_pb2_grpc.EventServiceStub(self.channel)
        self.deliveries = deliveries_pb2_grpc.DeliveryServiceStub(self.channel)

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> "HeraldClient":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def idempotent(self, call: Callable[[], T]) -> T:
        """Runs `call`, retrying with backoff (100 ms doubling to 2 s, +-20%) while it fails with
        UNAVAILABLE, at most `max_attempts` times. Only for calls that are safe to repeat:
        reads, and writes that carry an idempotency key."""
        delay = 0.1
        attempt = 1
        while True:
            try:
                return call()
            except grpc.RpcError as error:
                if error.code() not in RETRIED_CODES or attempt >= self.max_attempts:
                    raise
            time.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 2.0)
            attempt += 1

    def publish(
        self,
        event_type: str,
        payload: Payload,
        *,
        idempotency_key: Optional[str] = None,
        entity_type: str = "",
        entity_id: str = "",
        action: str = "",
        tenant_id: str = "",
        timeout: Optional[float] = None,
    ) -> events_pb2.PublishEventResponse:
        """Publishes one event; durable when this returns.

        Without `idempotency_key` a fresh one is made, so the retries here never publish
        twice; pass your own (e.g. your outbox row's id) to make retries across restarts safe.
        The same key with the same event returns the first reply; with a different event it is
        ALREADY_EXISTS. Raises `PublishError` (see its `retry_later`).
        """
        request = events_pb2.PublishEventRequest(
            tenant_id=tenant_id,
            event_type=event_type,
            payload=_payload_text(payload),
            idempotency_key=idempotency_key or new_idempotency_key(),
            entity_type=entity_type,
            entity_id=entity_id,
            action=action,
        )
        try:
            return self.idempotent(lambda: self.events.PublishEvent(request, timeout=timeout))
        except grpc.RpcError as error:
            raise PublishError(error, request.idempotency_key) from error

    def publish_many(
        self,
        events: Sequence[events_pb2.PublishEventRequest],
        *,
        timeout: Optional[float] = None,
    ) -> events_pb2.PublishEventsResponse:
        """Publishes up to 500 events, all or nothing; each without a key gets one."""
        request = events_pb2.PublishEventsRequest()
        for event in events:
            copy = request.events.add()
            copy.CopyFrom(event)
            if not copy.idempotency_key:
                copy.idempotency_key = new_idempotency_key()
        try:
            return self.idempotent(lambda: self.events.PublishEvents(request, timeout=timeout))
        except grpc.RpcError as error:
            raise PublishError(error, [e.idempotency_key for e in request.events]) from error


def _payload_text(payload: Payload) -> str:
    """The payload as sent: a mapping as compact JSON, text and UTF-8 bytes as they are."""
    if isinstance(payload, str):
        return payload
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload).decode("utf-8")
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
