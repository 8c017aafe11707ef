"""Invoices without servers: period math, lines and totals, status, and the PDF."""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest

from gpudeck.kit.errors import FailedPrecondition, InvalidArgument
from gpudeck.wallet import pdf
from gpudeck.wallet.invoices import (
    PAID,
    Invoice,
    Period,
    billable_period,
    build_lines,
    check_payable,
    describe,
    new_invoice,
    next_invoice_date,
    parse_period,
)

USD = 1_000_000
NOW = datetime(2025, 7, 3, 12, 0, tzinfo=UTC)


def invoice(spend: dict[str, int], name: str = "Acme", currency: str = "USD") -> Invoice:
    return new_invoice(uuid.uuid4(), uuid.uuid4(), name, Period(2025, 6), currency, spend, NOW)


def test_a_period_knows_its_days_and_neighbours() -> None:
    p = parse_period("2024-02")
    assert (p.start, p.last_day, p.end) == (date(2024, 2, 1), date(2024, 2, 29), date(2024, 3, 1))
    assert str(Period(2024, 12).next()) == "2025-01"
    assert str(Period(2025, 1).previous()) == "2024-12"
    assert Period.of(datetime(2025, 1, 31, 23, 59, tzinfo=UTC)) == Period(2025, 1)


@pytest.mark.parametrize("text", ["2025-13", "2025-00", "2025-6", "June", "2025/06", "1999-12", ""])
def test_a_bad_period_is_an_invalid_argument_naming_the_field(text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_period(text)
    assert err.value.field == "period"


def test_the_billable_period_defaults_to_the_last_complete_month() -> None:
    assert billable_period("", NOW) == Period(2025, 6)
    assert billable_period("2025-02", NOW) == Period(2025, 2)
    assert billable_period("", datetime(2025, 1, 1, 1, tzinfo=UTC)) == Period(2024, 12)


def test_a_month_is_invoiced_only_once_it_has_settled() -> None:
    """Spend dated in the last second of a month may commit just after it: an hour passes before
    the month is final, so an invoice issued on the stroke of midnight cannot miss it."""
    midnight = datetime(2025, 1, 1, tzinfo=UTC)
    assert billable_period("", midnight + timedelta(minutes=59)) == Period(2024, 11)
    with pytest.raises(InvalidArgument) as err:
        billable_period("2024-12", midnight + timedelta(minutes=59))
    assert "2025-01-01 01:00 UTC" in err.value.message
    assert billable_period("2024-12", midnight + timedelta(hours=1)) == Period(2024, 12)


@pytest.mark.parametrize("text", ["2025-07", "2025-08", "2031-01"])
def test_a_period_that_has_not_ended_cannot_be_invoiced(text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        billable_period(text, NOW)
    assert err.value.field == "period"
    assert "2025-06" in err.value.message


def test_the_next_invoice_is_on_the_first_day_of_next_month() -> None:
    assert next_invoice_date(NOW) == date(2025, 8, 1)
    assert next_invoice_date(datetime(2025, 12, 31, 23, 59, tzinfo=UTC)) == date(2026, 1, 1)


def test_until_the_month_just_ended_is_invoiced_the_next_invoice_is_today() -> None:
    """From midnight until the month has settled, its invoice is still to come: today, not a
    month away (it said the 1st of the next month)."""
    assert next_invoice_date(datetime(2027, 1, 1, 0, 30, tzinfo=UTC)) == date(2027, 1, 1)
    assert next_invoice_date(datetime(2027, 1, 1, 1, 0, tzinfo=UTC)) == date(2027, 2, 1)


def test_lines_come_one_per_resource_type_in_a_fixed_order_and_sum_to_the_total() -> None:
    spend = {"vm": 3 * USD, "pod": 10 * USD, "plan": 49 * USD, "gpu_hours": 1, "api": 0}
    inv = invoice(spend)
    assert [x.resource_type for x in inv.lines] == ["plan", "pod", "vm", "gpu_hours"]
    assert [x.description for x in inv.lines] == [
        "Plan fees",
        "GPU pods",
        "Virtual machines",
        "Gpu hours",
    ]
    assert inv.total == 62 * USD + 1
    assert inv.status == "open"


def test_refunds_beyond_charges_make_a_negative_line() -> None:
    lines = build_lines({"pod": -2 * USD, "vm": 5 * USD})
    assert sum(x.amount for x in lines) == 3 * USD
    assert lines[0].amount == -2 * USD


def test_an_empty_month_has_no_lines_and_a_zero_total() -> None:
    inv = invoice({})
    assert inv.lines == ()
    assert inv.total == 0


def test_descriptions_of_known_and_unknown_resource_types() -> None:
    assert describe("nfs_volume") == "NFS volumes"
    assert describe("object_storage") == "Object storage"
    assert describe("fine-tuning") == "Fine tuning"


def test_lines_survive_their_json() -> None:
    inv = invoice({"pod": 5, "vm": 7})
    assert Invoice.lines_from_json(inv.lines_json()) == inv.lines


def test_an_invoice_is_paid_once() -> None:
    inv = invoice({"pod": 5})
    check_payable(inv)
    paid = replace(inv, status=PAID, paid_at=NOW)
    with pytest.raises(FailedPrecondition) as err:
        check_payable(paid)
    assert err.value.reason == "INVOICE_ALREADY_PAID"


@pytest.mark.parametrize(
    ("micro", "text"),
    [
        (12_500_000, "12.50"),
        (417, "0.000417"),
        (1_234_000_000, "1,234.00"),
        (-1_500_000, "-1.50"),
        (0, "0.00"),
    ],
)
def test_amounts_are_printed_exactly(micro: int, text: str) -> None:
    assert pdf.format_amount(micro) == text


def test_the_pdf_is_a_pdf_with_the_organization_lines_and_total() -> None:
    inv = invoice({"pod": 123_456_789, "plan": 49 * USD}, name="Acme Robotics")
    document = pdf.render(inv)
    assert document.startswith(b"%PDF-")
    assert document.rstrip().endswith(b"%%EOF")
    assert b"Acme Robotics" in document
    assert b"USD 172.456789" in document
    assert b"GPU pods" in document and b"Plan fees" in document
    assert b"2025-06" in document and b"OPEN" in document
    assert pdf.filename(inv).startswith("invoice-2025-06-") and pdf.filename(inv).endswith(".pdf")


def test_the_pdf_survives_names_outside_latin_1() -> None:
    document = pdf.render(invoice({"pod": USD}, name="Ācme — 株式会社", currency="INR"))
    assert document.startswith(b"%PDF-")
    assert b"INR 1.00" in document


def test_long_names_stay_on_the_page_and_many_lines_repeat_the_header() -> None:
    name = " ".join(["Very Long Organization Name Holdings"] * 3)[:100]
    long_type = "x" * 40
    spend = {f"type_{i:02d}": USD for i in range(60)} | {long_type: USD}
    document = pdf.render(invoice(spend, name=name))
    assert b"(" + name.encode() + b")" not in document, "a name wider than the page wraps"
    assert all(word.encode() in document for word in set(name.split()))
    assert long_type.encode() not in document and b"xxxxxxxx..." in document  # cut short
    pages = len(re.findall(rb"/Type /Page\b(?!s)", document))
    assert pages >= 2
    assert document.count(b"(Resource type)") == pages  # the table's header on every page
    assert b"USD 61.00" in document


FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


@pytest.mark.skipif(not os.path.isfile(FONT), reason="no DejaVu Sans here (fonts-dejavu-core)")
def test_names_outside_latin_1_are_set_in_the_unicode_font_where_it_has_them() -> None:
    name = "Ωmega ☃ Лаб 株式会社"
    with_font = pdf.render(invoice({"pod": USD}, name=name), FONT)
    without = pdf.render(invoice({"pod": USD}, name=name))
    assert b"DejaVuSans" in with_font and b"DejaVuSans" not in without
    assert b"USD 1.00" in with_font  # Latin-1 text stays Helvetica, searchable
    # The font's glyphs for what it has; "?" only for what it lacks (here the CJK).
    from fpdf import FPDF

    doc = FPDF()
    doc.add_font("u", "", FONT)
    cmap = doc.fonts["u"].cmap
    assert all(ord(c) in cmap for c in "Ωmega ☃ Лаб")
    assert not any(ord(c) in cmap for c in "株式会社")


def test_the_invoice_font_setting() -> None:
    from gpudeck.kit.config import ConfigError
    from gpudeck.wallet.settings import WalletSettings

    assert WalletSettings.from_env({"GPUDECK_INVOICE_FONT": ""}).invoice_font == ""
    if os.path.isfile(FONT):
        assert WalletSettings.from_env({}).invoice_font == FONT
    with pytest.raises(ConfigError, match="GPUDECK_INVOICE_FONT"):
        WalletSettings.from_env({"GPUDECK_INVOICE_FONT": "/nonexistent/font.ttf"})
