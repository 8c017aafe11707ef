"""GET /invoices/{id}.pdf: an invoice of the caller's organization as a PDF.

The same `Authorization: Bearer <token>` as /graphql, and the same rule as the billing fields
(owner, admin, billing). Errors are JSON `{"error": {"code", "message"}}` with the HTTP status
of the code: 401 UNAUTHENTICATED, 403 FORBIDDEN, 404 NOT_FOUND (also another organization's
invoice), 400 BAD_USER_INPUT, 503 UNAVAILABLE.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web

from gpudeck.gateway.auth import Authenticator, rank, token_from
from gpudeck.gateway.backends import Backends
from gpudeck.gateway.errors import (
    BAD_USER_INPUT,
    FORBIDDEN,
    INTERNAL,
    NOT_FOUND,
    UNAUTHENTICATED,
    UNAVAILABLE,
    GatewayError,
    from_rpc,
    rpc_code,
)
from gpudeck.gateway.permissions import BillingReader
from gpudeck.gateway.walletclient import WalletClient
from gpudeck.proto.wallet.v1 import wallet_pb2

log = logging.getLogger(__name__)

PATH = "/invoices/{id}.pdf"
HTTP_STATUS = {
    UNAUTHENTICATED: 401,
    FORBIDDEN: 403,
    NOT_FOUND: 404,
    BAD_USER_INPUT: 400,
    UNAVAILABLE: 503,
}


def _error(code: str, message: str) -> web.Response:
    status = HTTP_STATUS.get(code, 500)
    headers = {"Cache-Control": "private, no-store"}  # one caller's answer, never shared
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


def handler(
    backends: Backends, auth: Authenticator
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The request handler of PATH."""

    async def invoice_pdf(request: web.Request) -> web.StreamResponse:
        try:
            identity = await auth.authenticate(token_from(request.headers, None))
        except GatewayError as exc:
            return _error(exc.code, exc.message)
        if rank(identity.role) < rank(BillingReader.minimum):
            return _error(FORBIDDEN, BillingReader.refusal)
        client = WalletClient(backends.channel("wallet"), actor=identity.actor)
        render = wallet_pb2.RenderInvoicePdfRequest(
            invoice_id=request.match_info["id"], organization_id=identity.organization_id
        )
        try:
            pdf = await client.wallet.RenderInvoicePdf(render, metadata=client.metadata)
        except grpc.aio.AioRpcError as exc:
            if rpc_code(exc) == INTERNAL:
                log.error("rendering an invoice failed: %s", exc.details())
            refusal = from_rpc(exc, {"invoice_id": "id"})  # the id in the path
            return _error(refusal.code, refusal.message)
        filename = pdf.filename.replace('"', "") or "invoice.pdf"
        return web.Response(
            body=pdf.pdf,
            content_type="application/pdf",
            headers={
                "Content-Disposition": f'attachment; filename="{filename}"',
                "Cache-Control": "private, no-store",
            },
        )

    return invoice_pdf
