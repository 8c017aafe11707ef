"""Which operation of a document runs: the one the request names. A document of several
operations sent without `operationName` is refused (BAD_REQUEST), as the GraphQL spec has it;
Strawberry ran the first one, which could be a money mutation nobody meant to send (a GraphiQL
tab or a codegen file holds several).

Refused at validation, which queries, mutations and subscriptions all pass through (a refusal
set at execution was not heeded by a subscription)."""

from __future__ import annotations

from collections.abc import Iterator

from graphql import GraphQLError, OperationDefinitionNode
from strawberry.extensions import SchemaExtension

from gpudeck.gateway.errors import BAD_REQUEST, GatewayError

UNNAMED = "the document has several operations: name the one to run in operationName"


class NamedOperation(SchemaExtension):
    """Refuses a document of several operations whose request names none of them. Listed after
    ValidationCache: the refusal joins what it found (in a list of its own, never the cached
    one), and the document's own validation is then not run."""

    def on_validate(self) -> Iterator[None]:
        ctx = self.execution_context
        document = ctx.graphql_document
        # The name the request gave (Strawberry's `operation_name` falls back to the first's).
        named = getattr(ctx, "_provided_operation_name", None)
        if document is not None and named is None:
            operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
            if len(operations) > 1:
                refusal = GatewayError(UNNAMED, code=BAD_REQUEST, field="operationName")
                error = GraphQLError(UNNAMED, original_error=refusal)
                ctx.pre_execution_errors = [*(ctx.pre_execution_errors or []), error]
        yield
