"""The schema: root types merged from one module per domain, limits, error codes and metrics.

A new domain adds its module under `types/` and its `Query` / `Mutation` / `Subscription` to the
tuples below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import strawberry
from graphql import GraphQLError
from strawberry.extensions import (
    AddValidationRules,
    MaxAliasesLimiter,
    MaxTokensLimiter,
    ParserCache,
    QueryDepthLimiter,
    SchemaExtension,
    ValidationCache,
)
from strawberry.schema.config import StrawberryConfig
from strawberry.schema.schema import DEFAULT_ALLOWED_OPERATION_TYPES
from strawberry.tools import merge_types
from strawberry.types import ExecutionContext, ExecutionResult
from strawberry.types.graphql import OperationType

from gpudeck.gateway import errors
from gpudeck.gateway.context import PerOperation
from gpudeck.gateway.ids import CanonicalIds
from gpudeck.gateway.introspection import IntrospectionNeedsToken
from gpudeck.gateway.metrics import OperationMetrics
from gpudeck.gateway.operation_choice import NamedOperation
from gpudeck.gateway.text import WellFormedText
from gpudeck.gateway.types import account, billing, health, organization, rates, wallet
from gpudeck.gateway.types.common import DATETIME_SCALAR, LONG_SCALAR, ROLE_SCALAR, Long, Role

MAX_DEPTH = 10
MAX_ALIASES = 30
MAX_TOKENS = 2000
CACHE_SIZE = 256

Query = merge_types("Query", (health.Query, account.Query, organization.Query, rates.Query))
Mutation = merge_types(
    "Mutation",
    (organization.Mutation, account.Mutation, wallet.Mutation, billing.Mutation, rates.Mutation),
)
Subscription = merge_types("Subscription", (health.Subscription, wallet.Subscription))


def _limits() -> Callable[[], SchemaExtension]:
    """The depth and alias limits as one factory whose rules are built once: a fresh rule class
    per request would make every ValidationCache lookup miss."""
    rules = [
        *QueryDepthLimiter(max_depth=MAX_DEPTH).validation_rules,
        *MaxAliasesLimiter(max_alias_count=MAX_ALIASES).validation_rules,
    ]
    return lambda: AddValidationRules(rules)


class GatewaySchema(strawberry.Schema):
    """Gives every error its `extensions.code` and logs only the errors a person must look at
    (see gpudeck.gateway.errors); runs subscriptions only as streams (websockets)."""

    async def execute(
        self,
        query: str | None,
        variable_values: dict[str, Any] | None = None,
        context_value: Any | None = None,
        root_value: Any | None = None,
        operation_name: str | None = None,
        allowed_operation_types: Iterable[OperationType] | None = None,
        operation_extensions: dict[str, Any] | None = None,
    ) -> ExecutionResult:
        """As Strawberry's, but a subscription sent as a single request (plain HTTP) is refused
        with InvalidOperationTypeError (HTTP 400) rather than run as a query and failing."""
        allowed = set(allowed_operation_types or DEFAULT_ALLOWED_OPERATION_TYPES)
        return await super().execute(
            query,
            variable_values=variable_values,
            context_value=context_value,
            root_value=root_value,
            operation_name=operation_name,
            allowed_operation_types=allowed - {OperationType.SUBSCRIPTION},
            operation_extensions=operation_extensions,
        )

    def process_errors(
        self, errors_: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        errors.process(errors_, execution_context.graphql_document if execution_context else None)


def build_schema() -> strawberry.Schema:
    """The gateway's schema. Extensions are factories: each request gets fresh instances."""
    extensions: list[type[SchemaExtension] | Callable[[], SchemaExtension]] = [
        PerOperation,
        lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
        lambda: ParserCache(maxsize=CACHE_SIZE),
        _limits(),
        lambda: ValidationCache(maxsize=CACHE_SIZE),
        NamedOperation,
        IntrospectionNeedsToken,
        OperationMetrics,
        CanonicalIds,
        WellFormedText,
    ]
    return GatewaySchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        extensions=extensions,
        config=StrawberryConfig(
            scalar_map={Role: ROLE_SCALAR, Long: LONG_SCALAR, datetime: DATETIME_SCALAR}
        ),
    )
