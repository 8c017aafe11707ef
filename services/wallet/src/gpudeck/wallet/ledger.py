"""The ledger's rules, in memory: what postings a transfer makes, and whether it may.

A `Book` holds the balances of the accounts a batch touches (loaded and locked by the store).
`Book.apply(request)` checks one transfer against the balances as they stand after the earlier
transfers of the batch, and on success moves them and returns the planned transaction; a refused
transfer changes nothing. Postings of a transaction sum to zero. Charges spend credits before
cash, the credit that expires first first; refunds give back where the latest spending came from
(`refunds`).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from functools import cached_property
from typing import NamedTuple

from gpudeck.kit.errors import DomainError, FailedPrecondition, InvalidArgument
from gpudeck.wallet.money import MAX_AMOUNT, check_amount, check_currency, format_micro
from gpudeck.wallet.rates import Conversion, format_rate
from gpudeck.wallet.refunds import Leg, unspend
from gpudeck.wallet.text import check_label, check_text


class Kind(StrEnum):
    TOPUP = "topup"
    CHARGE = "charge"
    REFUND = "refund"
    ADJUSTMENT = "adjustment"
    CREDIT_GRANT = "credit_grant"
    USAGE = "usage"
    CREDIT_EXPIRY = "credit_expiry"


# Where the other side of each kind's postings goes.
PLATFORM_ACCOUNT = {
    Kind.TOPUP: "funding",
    Kind.CHARGE: "revenue",
    Kind.USAGE: "revenue",
    Kind.REFUND: "revenue",
    Kind.ADJUSTMENT: "adjustments",
    Kind.CREDIT_GRANT: "credits_issued",
    Kind.CREDIT_EXPIRY: "credits_expired",
}
SPENDING = (Kind.CHARGE, Kind.USAGE)


class InsufficientFunds(FailedPrecondition):
    def __init__(self, message: str) -> None:
        super().__init__(message, field="amount", reason="INSUFFICIENT_FUNDS")


# The most a ledger account's balance (a bigint) holds either way.
BALANCE_LIMIT = 2**63 - 1


def past_balance_limit(amount: int, currency: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"amount {format_micro(amount)} {currency} would take a balance past the most a ledger"
        f" account holds ({format_micro(BALANCE_LIMIT)} {currency})",
        field="amount",
        reason="BALANCE_LIMIT",
    )


def kyc_required(message: str) -> FailedPrecondition:
    return FailedPrecondition(message, field="amount", reason="KYC_REQUIRED")


@dataclass(frozen=True)
class KycLimits:
    """What an organization not KYC-verified may add in all (top-ups and purchased credits), in
    micro-units of its wallet currency: a limit per currency, `other` for the rest; 0: none."""

    by_currency: Mapping[str, int] = field(default_factory=dict)
    other: int = 0

    def of(self, currency: str) -> int:
        return self.by_currency.get(currency, self.other)

    def any(self) -> bool:
        return bool(self.other or any(self.by_currency.values()))


def adds_money(request: TransferRequest) -> bool:
    """Whether the transfer is money the organization adds (what the KYC limit counts)."""
    return request.kind is Kind.TOPUP or (
        request.kind is Kind.CREDIT_GRANT and request.credit_source == "purchase"
    )


def check_kyc_room(limit: int, wallet: Wallet, amount: int) -> None:
    """An organization not KYC-verified may add at most `limit` in all (0: no limit)."""
    if limit and not wallet.kyc_verified and wallet.added + amount > limit:
        raise no_kyc_room(limit, wallet.added, wallet.currency)


def no_kyc_room(limit: int, added: int, currency: str) -> FailedPrecondition:
    return kyc_required(
        f"an organization not KYC-verified may add at most {format_micro(limit)} {currency}"
        f" in all ({format_micro(added)} added so far)"
    )


def short_of_funds(
    spendable: int, amount: int, currency: str, *, until: datetime | None = None
) -> InsufficientFunds:
    """The refusal of a charge (or hold) of `amount` when only `spendable` is left (`until`: the
    hold's end, when credits expiring before it are not counted)."""
    counted = f" (credits expiring before {until.isoformat()} not counted)" if until else ""
    return InsufficientFunds(
        f"insufficient funds: spendable {format_micro(spendable)} {currency}{counted}"
        f" < amount {format_micro(amount)} {currency}"
    )


def platform_pool(kind: Kind, currency: str) -> str:
    """The pool of platform accounts (shards) that takes the other side of `kind`."""
    return f"{PLATFORM_ACCOUNT[kind]}:{currency}"


@dataclass(frozen=True)
class SpendLine:
    """A part of a charge, for the rollups: what resource it paid for."""

    resource_type: str
    amount: int
    resource_id: str = ""
    project_id: uuid.UUID | None = None


@dataclass(frozen=True)
class TransferRequest:
    key: str
    organization_id: uuid.UUID
    kind: Kind
    amount: int
    currency: str = ""  # TOPUP: the payment currency; otherwise the wallet's (or empty)
    description: str = ""
    project_id: uuid.UUID | None = None
    resource_type: str = ""
    resource_id: str = ""
    credit_expires_at: datetime | None = None
    credit_source: str = ""
    reference: str = ""
    actor: str = ""
    lines: tuple[SpendLine, ...] = ()
    # Internal callers only: metered usage and hold captures may overdraw (auto-stop handles
    # it); billing ticks are atomic with their meters and need no idempotency record.
    allow_overdraft: bool = False
    record_key: bool = True
    # An automatic top-up being completed: its KYC room was checked when it was asked for, and
    # the payment is taken by now, so it is credited whatever the limit says since.
    kyc_checked: bool = False

    @cached_property
    def fingerprint(self) -> bytes:
        """What identifies the payload, for idempotency: equal requests, equal fingerprints."""
        parts = (
            "transfer",
            str(self.organization_id),
            self.kind.value,
            str(self.amount),
            self.currency,
            self.description,
            str(self.project_id or ""),
            self.resource_type,
            self.resource_id,
            self.credit_expires_at.isoformat() if self.credit_expires_at else "",
            self.credit_source,
            self.reference,
        )
        return hashlib.sha256("\x1f".join(parts).encode()).digest()

    def in_wallet_terms(self, wallet_currency: str | None) -> TransferRequest:
        """This request with its currency left out if it names the wallet's own: the same
        payment either way, so one fingerprint (a retry may name it or not)."""
        if self.currency and self.currency == wallet_currency:
            return replace(self, currency="")
        return self

    def spend_lines(self, amount: int) -> tuple[SpendLine, ...]:
        if self.lines:
            return self.lines
        return (
            SpendLine(self.resource_type or "other", amount, self.resource_id, self.project_id),
        )


# Ledger keys the wallet writes itself (meters, usage, holds, plans, expiries, auto top-ups):
# a caller's key may not start with one, so it can never collide with them.
RESERVED_KEY_PREFIXES = (
    "auto-topup:", "credit-expiry:", "hold:", "meter:", "organization-deleted:", "plan:",
    "usage-event:", "usage:",
)  # fmt: skip


def check_client_key(key: str) -> str:
    """A caller's idempotency key: at most 200 plain characters, and not one of the wallet's
    own (InvalidArgument)."""
    check_text(key, "idempotency_key")
    if key.startswith(RESERVED_KEY_PREFIXES):
        raise InvalidArgument(
            f"idempotency_key may not start with {key.split(':', 1)[0]}: (the wallet's own keys)",
            field="idempotency_key",
        )
    return key


def validate(request: TransferRequest) -> TransferRequest:
    """Check what needs no balances; raise InvalidArgument naming the field."""
    if not request.key.strip():
        raise InvalidArgument("idempotency_key is required", field="idempotency_key")
    check_text(request.key, "idempotency_key", max_length=300)  # a meter's keys hold its id
    check_text(request.description, "description", max_length=1000)
    check_text(request.reference, "reference")
    check_text(request.resource_id, "resource_id")
    if request.resource_type:
        check_label(request.resource_type, "resource_type")
    check_amount(request.amount, allow_negative=request.kind is Kind.ADJUSTMENT)
    if request.currency:
        check_currency(request.currency)
    if request.kind is Kind.CREDIT_GRANT and request.credit_source not in (
        "",
        "plan",
        "promotion",
        "purchase",
    ):
        raise InvalidArgument(
            "credit_source must be plan, promotion or purchase", field="credit_source"
        )
    if request.lines and sum(line.amount for line in request.lines) != request.amount:
        raise InvalidArgument("lines must sum to the amount", field="lines")
    return request


@dataclass
class Account:
    id: int
    balance: int
    kind: str = "cash"
    expires_at: datetime | None = None
    code: str = ""


@dataclass
class Wallet:
    """A wallet as one batch sees it: its totals (kept by deltas) and the accounts it may spend.

    `balance` and `credit_total` come from the locked wallet row and move with every posting;
    `credits` lists the credit accounts with money left, the first to expire first.
    """

    organization_id: uuid.UUID
    currency: str
    cash: Account
    credits: list[Account]
    balance: int
    credit_total: int
    held_balance: int
    run_rate: int = 0
    level: str = "ok"
    kyc_verified: bool = True
    added: int = 0  # top-ups and purchased credits ever (counted when not KYC-verified)

    @property
    def spendable(self) -> int:
        return self.balance - self.held_balance

    def spendable_at(self, now: datetime | None) -> int:
        """Spendable without credits already past their expiry (the sweep may not have run)."""
        return self.spendable - sum(c.balance for c in self.credits if _expired(c, now))


class Posting(NamedTuple):
    """One entry of a planned transaction (a tuple: a batch makes thousands)."""

    account_id: int
    account_code: str
    amount: int
    balance_before: int
    balance_after: int


class PlannedTransaction(NamedTuple):
    """What `Book.apply` decided for one transfer (a tuple: a batch makes thousands)."""

    id: uuid.UUID
    request: TransferRequest
    amount: int  # in the wallet currency (for ADJUSTMENT: signed)
    currency: str
    payment_amount: int | None
    payment_currency: str | None
    exchange_rate: str | None
    postings: tuple[Posting, ...]
    balance_after: int
    credits_after: int
    spend: tuple[SpendLine, ...] = ()  # what it adds to spending (negative for refunds)


@dataclass
class Book:
    """The balances one batch works on: wallets by organization, and one locked platform
    account per pool it needs."""

    wallets: dict[uuid.UUID, Wallet]
    platform: dict[str, Account]
    # (payment currency, wallet currency) → rate, for top-ups across currencies.
    rates: dict[tuple[str, str], Conversion] = field(default_factory=dict)  # payment → wallet
    # Credit accounts made for this batch's CREDIT_GRANTs, by organization and idempotency key
    # (keys are each organization's own: two may grant under the same one).
    new_credit_accounts: dict[tuple[uuid.UUID, str], Account] = field(default_factory=dict)
    # Credits expiring at or before `now` are not spent (the sweeper moves them out).
    now: datetime | None = None
    # What organizations not KYC-verified may add in all, by wallet currency.
    kyc_limits: KycLimits = field(default_factory=KycLimits)
    # The spending history (`refunds`), oldest first, of organizations with credit grants that
    # this batch refunds; without one a refund goes to cash. Grants with nothing left, by id.
    spending: dict[uuid.UUID, list[Leg]] = field(default_factory=dict)
    spent_credits: dict[int, Account] = field(default_factory=dict)

    def apply(self, request: TransferRequest, transaction_id: uuid.UUID) -> PlannedTransaction:
        wallet = self.wallets.get(request.organization_id)
        if wallet is None:
            raise InvalidArgument(
                f"organization {request.organization_id} has no wallet", field="organization_id"
            )
        expiry = request.credit_expires_at  # checked here, not in `validate`: a retry of a grant
        if (  # that was taken before its expiry passed is answered, not refused
            request.kind is Kind.CREDIT_GRANT
            and expiry is not None
            and expiry <= (self.now or datetime.now(UTC))
        ):
            raise InvalidArgument(
                f"credit_expires_at must be in the future, got {expiry.isoformat()}",
                field="credit_expires_at",
            )
        amount, payment, rate = self._wallet_amount(request, wallet)
        adding = adds_money(request)
        if adding and not request.kyc_checked:
            check_kyc_room(self.kyc_limits.of(wallet.currency), wallet, amount)
        other = self.platform[platform_pool(request.kind, wallet.currency)]
        legs = self._legs(request, wallet, amount)
        total = sum([delta for _, delta in legs])
        after = [acct.balance + delta for acct, delta in legs]
        if any(
            abs(b) > BALANCE_LIMIT for b in (*after, other.balance - total, wallet.balance + total)
        ):
            raise past_balance_limit(amount, wallet.currency)
        postings = [_move(acct, delta) for acct, delta in legs]
        postings.append(_move(other, -total))
        for acct, delta in legs:
            wallet.balance += delta
            if acct.kind == "credit":
                wallet.credit_total += delta
        if adding:
            wallet.added += amount
        history = self.spending.get(wallet.organization_id)
        if history is not None and request.kind in (*SPENDING, Kind.REFUND):
            history.extend((acct.id, delta) for acct, delta in legs)
        if wallet.credits:
            left = []
            for credit in wallet.credits:
                if credit.balance > 0 or credit.kind != "credit":
                    left.append(credit)
                else:  # a refund later in the batch may give it money back
                    self.spent_credits[credit.id] = credit
            wallet.credits = left
        spend: tuple[SpendLine, ...] = ()
        if request.kind in SPENDING:
            spend = request.spend_lines(amount)
        elif request.kind is Kind.REFUND:
            spend = tuple(
                SpendLine(s.resource_type, -s.amount, s.resource_id, s.project_id)
                for s in request.spend_lines(amount)
            )
        return PlannedTransaction(
            id=transaction_id,
            request=request,
            amount=amount,
            currency=wallet.currency,
            payment_amount=payment if request.kind is Kind.TOPUP else None,
            payment_currency=(request.currency or wallet.currency)
            if request.kind is Kind.TOPUP
            else None,
            exchange_rate=rate,
            postings=tuple(postings),
            balance_after=wallet.balance,
            credits_after=wallet.credit_total,
            spend=spend,
        )

    def _wallet_amount(
        self, request: TransferRequest, wallet: Wallet
    ) -> tuple[int, int, str | None]:
        """The amount in the wallet currency; for top-ups also what was paid and the rate."""
        currency = request.currency or wallet.currency
        if currency == wallet.currency:
            return request.amount, request.amount, None
        if request.kind is not Kind.TOPUP:
            raise InvalidArgument(
                f"currency {currency} is not the wallet currency {wallet.currency}",
                field="currency",
            )
        rate = self.rates.get((currency, wallet.currency))
        if rate is None:
            raise FailedPrecondition(
                f"no exchange rate from {currency} to {wallet.currency} is set",
                field="currency",
                reason="EXCHANGE_RATE_MISSING",
            )
        converted = rate.apply_factor(request.amount)  # what payment × the recorded rate gives
        if converted <= 0:
            raise InvalidArgument("amount converts to nothing at the current rate", field="amount")
        if converted > MAX_AMOUNT:
            raise InvalidArgument(
                f"amount is too large: {format_micro(request.amount)} {currency} is"
                f" {format_micro(converted)} {wallet.currency} at the current rate, and a call"
                f" may move at most {format_micro(MAX_AMOUNT)} {wallet.currency}",
                field="amount",
            )
        return converted, request.amount, format_rate(rate.factor)

    def _legs(
        self, request: TransferRequest, wallet: Wallet, amount: int
    ) -> list[tuple[Account, int]]:
        kind = request.kind
        if kind is Kind.REFUND:
            return self._refund_legs(wallet, amount)
        if kind in (Kind.TOPUP, Kind.ADJUSTMENT):
            return [(wallet.cash, amount)]
        if kind is Kind.CREDIT_GRANT:
            account = self.new_credit_accounts[request.organization_id, request.key]
            wallet.credits.append(account)
            wallet.credits.sort(key=_expiry_order)
            return [(account, amount)]
        if kind is Kind.CREDIT_EXPIRY:
            expiring = next((c for c in wallet.credits if c.id == int(request.reference)), None)
            if expiring is None or expiring.balance < amount:
                raise FailedPrecondition("credit account has less left than expires")
            return [(expiring, -amount)]
        # CHARGE, USAGE: credits first, then cash.
        spendable = wallet.spendable_at(self.now)
        if not request.allow_overdraft and kind is Kind.CHARGE and spendable < amount:
            raise short_of_funds(spendable, amount, wallet.currency)
        legs: list[tuple[Account, int]] = []
        left = amount
        for credit in wallet.credits:
            if left == 0:
                break
            if _expired(credit, self.now):
                continue
            take = min(credit.balance, left)
            if take > 0:
                legs.append((credit, -take))
                left -= take
        if left:
            legs.append((wallet.cash, -left))
        return legs

    def _refund_legs(self, wallet: Wallet, amount: int) -> list[tuple[Account, int]]:
        history = self.spending.get(wallet.organization_id)
        if history is None:
            return [(wallet.cash, amount)]
        back, rest = unspend(amount, reversed(history))
        legs = dict(back)
        if rest:
            legs[wallet.cash.id] = legs.get(wallet.cash.id, 0) + rest
        return [(self._account(wallet, account_id), take) for account_id, take in legs.items()]

    def _account(self, wallet: Wallet, account_id: int) -> Account:
        """One of the wallet's accounts by id; a spent grant given money back becomes one of
        the credits it may spend again."""
        if account_id == wallet.cash.id:
            return wallet.cash
        for credit in wallet.credits:
            if credit.id == account_id:
                return credit
        account = self.spent_credits.pop(account_id)
        wallet.credits.append(account)
        wallet.credits.sort(key=_expiry_order)
        return account


def _expired(account: Account, now: datetime | None) -> bool:
    return bool(now and account.expires_at and account.expires_at <= now)


def _expiry_order(account: Account) -> tuple[bool, float, int]:
    expires = account.expires_at
    return (expires is None, expires.timestamp() if expires else 0.0, account.id)


def _move(account: Account, delta: int) -> Posting:
    before = account.balance
    account.balance = before + delta
    return Posting(account.id, account.code, delta, before, account.balance)


class PostingView(NamedTuple):
    account: str
    amount: int
    balance_before: int
    balance_after: int


@dataclass(frozen=True)
class Transaction:
    """A committed ledger transaction as callers see it."""

    id: uuid.UUID
    organization_id: uuid.UUID
    kind: Kind
    amount: int
    currency: str
    payment_amount: int | None
    payment_currency: str | None
    exchange_rate: str | None
    description: str
    project_id: uuid.UUID | None
    resource_type: str
    resource_id: str
    reference: str
    idempotency_key: str
    actor: str
    balance_after: int
    created_at: datetime
    postings: tuple[PostingView, ...]


@dataclass
class Outcome:
    """One transfer's result: its transaction, or why it was refused."""

    transaction: Transaction | None = None
    error: DomainError | None = None


def posted_in_wallet_currency(
    request: TransferRequest,
    transaction_id: uuid.UUID,
    currency: str,
    balance_after: int,
    created_at: datetime,
    postings: tuple[PostingView, ...],
) -> Transaction:
    """The transaction a fast path posted for `request` (in the wallet currency, no rate)."""
    topup = request.kind is Kind.TOPUP
    return Transaction(
        id=transaction_id,
        organization_id=request.organization_id,
        kind=request.kind,
        amount=request.amount,
        currency=currency,
        payment_amount=request.amount if topup else None,
        payment_currency=currency if topup else None,
        exchange_rate=None,
        description=request.description,
        project_id=request.project_id,
        resource_type=request.resource_type,
        resource_id=request.resource_id,
        reference=request.reference,
        idempotency_key=request.key,
        actor=request.actor,
        balance_after=balance_after,
        created_at=created_at,
        postings=postings,
    )
