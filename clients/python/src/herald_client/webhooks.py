"""Verifying Herald's webhooks on the receiving side, through the Standard Webhooks library.

Herald signs `webhook-id.webhook-timestamp.body` with the subscription's `whsec_...` secret
(HMAC-SHA256, `v1,<base64>`; during a rotation's grace period one signature per valid secret)
and signs every attempt anew, so a retry hours later still passes the 5-minute tolerance.
"""

from __future__ import annotations

from typing import Any, Mapping, Union

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

__all__ = ["verify", "WebhookVerificationError"]


def verify(secret: str, body: Union[bytes, str], headers: Mapping[str, str]) -> Any:
    """Checks a received webhook and returns its JSON payload.

    `body` must be the request body exactly as received (not re-serialized JSON); `headers`
    any mapping with `webhook-id`, `webhook-timestamp` and `webhook-signature` (any case).
    Raises `WebhookVerificationError` when a header is missing, the timestamp is more than 5
    minutes off, or no signature matches. De-duplicate on `webhook-id`: it is the event id, the
    same on every retry.
    """
    return Webhook(secret).verify(body, dict(headers))
