"""The root's meta fields (`__schema`, `__type`, `__typename`) need a valid token like every
other field but `health`: the issue's contract is "without a valid token every operation but
health fails with UNAUTHENTICATED", and the schema is the API's map. The schema's own fields
each refuse through their permissions (every root field but `health` has one); the meta fields
have no resolver of ours, so the operation asking for one is refused here, as a whole.
`__typename` inside a selection (`health { __typename }`) is not at the root and needs nothing.
GraphiQL sends the Headers tab's token with its introspection query, so admins get their docs
and completion once it is set.

Checked once per operation, before it runs, from the parsed document (fragments followed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
)
from graphql import ExecutionResult as GraphQLExecutionResult
from strawberry.extensions import SchemaExtension

from gpudeck.gateway.context import Context
from gpudeck.gateway.errors import GatewayError

META_FIELDS = frozenset({"__schema", "__type", "__typename"})


def asks_for_meta_fields(document: DocumentNode, operation_name: str | None) -> bool:
    """Whether the operation to run selects `__schema`, `__type` or `__typename` at its
    root."""
    fragments = {
        d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
    }
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    chosen = [
        op
        for op in operations
        if operation_name is None or (op.name is not None and op.name.value == operation_name)
    ]
    seen: set[str] = set()

    def walk(selection_set: SelectionSetNode) -> bool:
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                if selection.name.value in META_FIELDS:
                    return True
            elif isinstance(selection, InlineFragmentNode):
                if walk(selection.selection_set):
                    return True
            elif isinstance(selection, FragmentSpreadNode):
                name = selection.name.value
                if name not in seen and name in fragments:
                    seen.add(name)
                    if walk(fragments[name].selection_set):
                        return True
        return False

    return any(walk(op.selection_set) for op in chosen)


class IntrospectionNeedsToken(SchemaExtension):
    """Refuses an operation that asks for a meta field at its root without a valid token."""

    async def on_execute(self) -> AsyncIterator[None]:
        ctx = self.execution_context
        context = ctx.context
        document = ctx.graphql_document
        if (
            isinstance(context, Context)
            and document is not None
            and asks_for_meta_fields(document, ctx.operation_name)
        ):
            try:
                await context.identity()
            except GatewayError as refusal:
                ctx.result = GraphQLExecutionResult(
                    data=None, errors=[GraphQLError(refusal.message, original_error=refusal)]
                )
        yield
