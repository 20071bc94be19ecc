"""Herald's Python client: the generated stubs (`herald.v1`) plus a thin, typed helper.

    from herald_client import HeraldClient
    from herald.v1 import subscriptions_pb2

    with HeraldClient("127.0.0.1:50051", token) as herald:
        herald.publish("user.new", {"id": 42}, entity_type="user", entity_id="42")
"""

from herald_client._client import (
    RETRIED_CODES,
    HeraldClient,
    PublishError,
    new_idempotency_key,
)

__all__ = ["HeraldClient", "PublishError", "RETRIED_CODES", "new_idempotency_key"]
