"""The embedded transport: the ledger runs in this process, on a SQLite file or in memory.

Async methods call the ledger directly: an operation is a single short SQLite transaction, cheaper than a hop to a
worker thread.
"""

from __future__ import annotations

from typing import Any

from ..ledger import Ledger
from ..models import (
    BalanceResponse,
    CommitRequest,
    CommitResponse,
    DecisionRequest,
    DecisionResponse,
    EventCreateRequest,
    EventCreateResponse,
    ReleaseRequest,
    ReleaseResponse,
    ReservationCreateRequest,
    ReservationCreateResponse,
    ReservationDetail,
    ReservationExtendRequest,
    ReservationExtendResponse,
    ReservationListResponse,
)


class LocalTransport:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.admin = ledger.admin
        self.url = ledger.store.url

    def reserve(self, request: ReservationCreateRequest) -> ReservationCreateResponse:
        return self.ledger.reserve(request)

    def commit(self, reservation_id: str, request: CommitRequest) -> CommitResponse:
        return self.ledger.commit(reservation_id, request)

    def release(self, reservation_id: str, request: ReleaseRequest) -> ReleaseResponse:
        return self.ledger.release(reservation_id, request)

    def extend(self, reservation_id: str, request: ReservationExtendRequest) -> ReservationExtendResponse:
        return self.ledger.extend(reservation_id, request)

    def decide(self, request: DecisionRequest) -> DecisionResponse:
        return self.ledger.decide(request)

    def event(self, request: EventCreateRequest) -> EventCreateResponse:
        return self.ledger.event(request)

    def get_reservation(self, reservation_id: str) -> ReservationDetail:
        return self.ledger.get_reservation(reservation_id)

    def list_reservations(self, query: dict[str, Any]) -> ReservationListResponse:
        return self.ledger.list_reservations(query)

    def balances(self, query: dict[str, Any]) -> BalanceResponse:
        return self.ledger.balances(query)

    async def areserve(self, request: ReservationCreateRequest) -> ReservationCreateResponse:
        return self.ledger.reserve(request)

    async def acommit(self, reservation_id: str, request: CommitRequest) -> CommitResponse:
        return self.ledger.commit(reservation_id, request)

    async def arelease(self, reservation_id: str, request: ReleaseRequest) -> ReleaseResponse:
        return self.ledger.release(reservation_id, request)

    async def aextend(self, reservation_id: str, request: ReservationExtendRequest) -> ReservationExtendResponse:
        return self.ledger.extend(reservation_id, request)

    async def adecide(self, request: DecisionRequest) -> DecisionResponse:
        return self.ledger.decide(request)

    async def aevent(self, request: EventCreateRequest) -> EventCreateResponse:
        return self.ledger.event(request)

    async def abalances(self, query: dict[str, Any]) -> BalanceResponse:
        return self.ledger.balances(query)

    def close(self) -> None:
        self.ledger.store.close()
