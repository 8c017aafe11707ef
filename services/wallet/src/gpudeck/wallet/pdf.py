"""An invoice as a PDF document (fpdf2; nothing fetched).

Text is set in the built-in Helvetica, which covers Latin-1. A name outside it (Greek, Cyrillic,
symbols, other scripts) is set in a Unicode TrueType font when the deployment has one
(`font`: GPUDECK_INVOICE_FONT, by default Debian's DejaVu Sans when installed); characters that
font lacks, or every one outside Latin-1 without such a font, print as "?". Long names wrap in
the header and are cut short ("...") in table cells; lines that do not fit go on to further
pages under the table's header again. The page content is left uncompressed: invoices are
short, and their Latin-1 text stays searchable in the bytes.
"""

from __future__ import annotations

from typing import Any

from fpdf import FPDF
from fpdf.enums import XPos, YPos
from fpdf.fonts import TTFFont

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


UNICODE = "unicode"  # the name the TrueType font is added under


def _text(value: str) -> str:
    return value.translate(PLAIN).encode("latin-1", errors="replace").decode("latin-1")


def _cell(
    doc: FPDF, width: float, height: float, value: str, *, wrap: bool = False, **kwargs: Any
) -> None:
    """A cell of free text: Helvetica when it is Latin-1, else the Unicode font if there is one
    (its missing characters as "?"), else Helvetica with "?". Too long for `width`, it wraps
    onto more lines (`wrap`) or is cut short with "..."."""
    plain = value.translate(PLAIN)
    font = doc.fonts.get(UNICODE)
    style, size = doc.font_style, doc.font_size_pt
    shown = _text(plain)
    try:
        plain.encode("latin-1")
    except UnicodeEncodeError:
        if isinstance(font, TTFFont):
            doc.set_font(UNICODE, "", size)
            shown = "".join(c if ord(c) in font.cmap else "?" for c in plain)
    if wrap:
        doc.multi_cell(width, height, shown, **kwargs)
    else:
        doc.cell(width, height, _fit(doc, shown, width), **kwargs)
    doc.set_font("Helvetica", style, size)


def _fit(doc: FPDF, text: str, width: float) -> str:
    """`text`, cut short with "..." to fit in a cell `width` wide (with its margins)."""
    room = width - 2 * doc.c_margin
    if doc.get_string_width(text) <= room:
        return text
    while text and doc.get_string_width(text + "...") > room:
        text = text[:-1]
    return text + "..."


def check_font(font: str) -> str:
    """`font` if it loads as an invoice font; ValueError saying why not (a wallet checks its
    GPUDECK_INVOICE_FONT at start, so a bad file is a configuration error, not a failing PDF)."""
    try:
        FPDF().add_font(UNICODE, "", font)
    except Exception as exc:
        raise ValueError(f"{font!r} is not a font fpdf can use ({type(exc).__name__})") from None
    return font


def render(invoice: Invoice, font: str = "") -> bytes:
    """The invoice on A4: issuer, organization, period, status, lines and total;
    `font`: a Unicode TrueType font file for names outside Latin-1 ("" for none)."""
    doc = FPDF(format="A4")
    if font:
        doc.add_font(UNICODE, "", font)
    doc.set_compression(False)
    doc.set_creator(ISSUER)
    doc.set_title(f"Invoice {invoice.period} - {invoice.organization_name}")  # metadata: Unicode
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
        _cell(doc, width - 40, 6, value, wrap=True, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    doc.ln(6)

    amount_w, type_w = 45, 45
    desc_w = width - amount_w - type_w

    def header() -> None:
        doc.set_font("Helvetica", "B", 10)
        doc.cell(desc_w, 8, "Description")
        doc.cell(type_w, 8, "Resource type")
        doc.cell(amount_w, 8, f"Amount ({invoice.currency})", align="R")
        doc.ln(8)
        _rule(doc)
        doc.set_font("Helvetica", "", 10)

    header()
    if not invoice.lines:
        doc.set_text_color(*GREY)
        doc.cell(width, 8, "No charges in this period.", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        doc.set_text_color(0, 0, 0)
    for line in invoice.lines:
        if doc.will_page_break(8):
            doc.add_page()
            header()
        _cell(doc, desc_w, 8, line.description)
        _cell(doc, type_w, 8, line.resource_type)
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
