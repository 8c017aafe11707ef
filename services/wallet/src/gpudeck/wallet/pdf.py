"""An invoice as a PDF document (fpdf2, built-in Helvetica: no font files, nothing fetched).

The page content is left uncompressed: invoices are one page, and their text stays searchable
in the bytes. Helvetica covers Latin-1; other characters print as "?".
"""

from __future__ import annotations

from fpdf import FPDF
from fpdf.enums import XPos, YPos

from gpudeck.wallet.invoices import Invoice

ISSUER = "gpudeck"
GREY = (110, 110, 110)
RULE = (200, 200, 200)


def format_amount(amount: int) -> str:
    """Micro-units for people, exactly: 12500000 → "12.50", 417 → "0.000417"."""
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), 1_000_000)
    decimals = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole:,}.{decimals}"


def filename(invoice: Invoice) -> str:
    return f"invoice-{invoice.period}-{str(invoice.id)[:8]}.pdf"


# Typography outside Latin-1 that has a plain equivalent.
PLAIN = str.maketrans(
    {
        "\u2013": "-",
        "\u2014": "-",
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2026": "...",
        "\u20b9": "Rs.",
    }
)


def _text(value: str) -> str:
    return value.translate(PLAIN).encode("latin-1", errors="replace").decode("latin-1")


def render(invoice: Invoice) -> bytes:
    """The invoice on one A4 page: issuer, organization, period, status, lines and total."""
    doc = FPDF(format="A4")
    doc.set_compression(False)
    doc.set_creator(ISSUER)
    doc.set_title(_text(f"Invoice {invoice.period} - {invoice.organization_name}"))
    doc.set_auto_page_break(auto=True, margin=20)
    doc.add_page()
    width = doc.epw

    doc.set_font("Helvetica", "B", 22)
    doc.cell(width / 2, 12, "Invoice")
    doc.set_font("Helvetica", "B", 14)
    doc.cell(width / 2, 12, ISSUER, align="R", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    doc.ln(4)

    facts = [
        ("Organization", invoice.organization_name),
        ("Organization ID", str(invoice.organization_id)),
        ("Invoice ID", str(invoice.id)),
        (
            "Period",
            f"{invoice.period} ({invoice.period.start.isoformat()}"
            f" to {invoice.period.last_day.isoformat()})",
        ),
        ("Issued", invoice.issued_at.strftime("%Y-%m-%d")),
        ("Currency", invoice.currency),
        ("Status", _status(invoice)),
    ]
    for label, value in facts:
        doc.set_font("Helvetica", "", 10)
        doc.set_text_color(*GREY)
        doc.cell(40, 6, label)
        doc.set_text_color(0, 0, 0)
        doc.cell(width - 40, 6, _text(value), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    doc.ln(6)

    amount_w, type_w = 45, 45
    desc_w = width - amount_w - type_w
    doc.set_font("Helvetica", "B", 10)
    doc.cell(desc_w, 8, "Description")
    doc.cell(type_w, 8, "Resource type")
    doc.cell(amount_w, 8, f"Amount ({invoice.currency})", align="R")
    doc.ln(8)
    _rule(doc)
    doc.set_font("Helvetica", "", 10)
    if not invoice.lines:
        doc.set_text_color(*GREY)
        doc.cell(width, 8, "No charges in this period.", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        doc.set_text_color(0, 0, 0)
    for line in invoice.lines:
        doc.cell(desc_w, 8, _text(line.description))
        doc.cell(type_w, 8, _text(line.resource_type))
        doc.cell(amount_w, 8, format_amount(line.amount), align="R")
        doc.ln(8)
    _rule(doc)
    doc.set_font("Helvetica", "B", 12)
    doc.cell(desc_w + type_w, 10, "Total")
    doc.cell(
        amount_w,
        10,
        f"{invoice.currency} {format_amount(invoice.total)}",
        align="R",
        new_x=XPos.LMARGIN,
        new_y=YPos.NEXT,
    )
    doc.ln(10)
    doc.set_font("Helvetica", "", 8)
    doc.set_text_color(*GREY)
    doc.multi_cell(
        width,
        4,
        "Charges are per-second usage and one-off fees deducted from the prepaid wallet,"
        " including any part paid with credits. Amounts are exact to 1/1,000,000 of the currency.",
        align="L",
    )
    return bytes(doc.output())


def _status(invoice: Invoice) -> str:
    if invoice.paid_at is not None:
        return f"{invoice.status.upper()} on {invoice.paid_at.strftime('%Y-%m-%d')}"
    return invoice.status.upper()


def _rule(doc: FPDF) -> None:
    doc.set_draw_color(*RULE)
    doc.line(doc.l_margin, doc.get_y(), doc.l_margin + doc.epw, doc.get_y())
    doc.ln(1)
