"""Reserve, decide and event read a request's canonical data and fingerprint from one serialisation (`canonical`);
commit, release and extend hash the model directly (`fingerprint`). Both must give the same digest, or a replay
through one path would not match a request first seen through the other."""

from __future__ import annotations

import pytest

from cycles.ledger.rules import canonical, fingerprint
from cycles.models import DecisionRequest, EventCreateRequest, ReservationCreateRequest

SUBJECT = {"tenant": "acme", "agent": "bot", "dimensions": {"zone": "eu", "cost_center": "r&d"}}
METADATA = {"z": 1, "a": {"y": [3, {"k": "v", "b": None}], "b": "é"}}


@pytest.mark.parametrize(
    "request_",
    [
        ReservationCreateRequest.model_validate(
            {
                "idempotency_key": "k1",
                "subject": SUBJECT,
                "action": {"kind": "llm.completion", "name": "gpt-4o", "tags": ["b", "a"]},
                "estimate": {"unit": "USD_MICROCENTS", "amount": 5},
                "metadata": METADATA,
            }
        ),
        DecisionRequest.model_validate(
            {
                "idempotency_key": "k2",
                "subject": SUBJECT,
                "action": {"kind": "tool", "name": "search"},
                "estimate": {"unit": "TOKENS", "amount": 7},
            }
        ),
        EventCreateRequest.model_validate(
            {
                "idempotency_key": "k3",
                "subject": SUBJECT,
                "action": {"kind": "tool", "name": "search"},
                "actual": {"unit": "CREDITS", "amount": 9},
                "metadata": METADATA,
            }
        ),
    ],
    ids=["reserve", "decide", "event"],
)
def test_canonical_data_and_digest_match_the_model(request_) -> None:
    data, digest = canonical(request_)
    assert digest == fingerprint(request_)
    assert data == request_.model_dump(mode="json", exclude_none=True)
    assert list(data["subject"]["dimensions"]) == ["cost_center", "zone"]  # free-form maps in sorted order


def test_the_digest_follows_the_payload_not_its_key_order() -> None:
    body = {
        "idempotency_key": "k1",
        "subject": SUBJECT,
        "action": {"kind": "llm.completion", "name": "gpt-4o"},
        "estimate": {"unit": "USD_MICROCENTS", "amount": 5},
        "metadata": METADATA,
    }
    reordered = dict(reversed(list(body.items())), metadata=dict(reversed(list(METADATA.items()))))
    first, again = ReservationCreateRequest.model_validate(body), ReservationCreateRequest.model_validate(reordered)
    assert canonical(first)[1] == canonical(again)[1]
    changed = ReservationCreateRequest.model_validate({**body, "metadata": {**METADATA, "z": 2}})
    assert canonical(changed)[1] != canonical(first)[1]
