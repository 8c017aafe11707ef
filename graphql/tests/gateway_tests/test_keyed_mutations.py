"""Every mutation takes an idempotencyKey. For those that set a value, a late retry with the key
gets the first answer and cannot undo a newer change."""

from __future__ import annotations

from gpudeck.gateway.schema import build_schema

RENAME = """mutation($org: ID!, $id: ID!, $name: String!, $key: String) {
  renameProject(organizationId: $org, id: $id, name: $name, idempotencyKey: $key) { id name }
}"""
PROJECTS = "query($id: ID!) { organization(id: $id) { projects { id name } } }"
THRESHOLDS = """mutation($org: ID!, $warning: String, $critical: String, $key: String) {
  setLowBalanceThresholds(organizationId: $org, warningAmount: $warning,
                          criticalAmount: $critical, idempotencyKey: $key) {
    warningAmount { amount } criticalAmount { amount }
  }
}"""


def test_every_mutation_takes_an_idempotency_key() -> None:
    mutations = build_schema()._schema.mutation_type
    assert mutations is not None
    keyless = [name for name, f in mutations.fields.items() if "idempotencyKey" not in f.args]
    assert keyless == []


async def test_a_late_retry_of_a_rename_keeps_the_newer_name(gql, new_org) -> None:
    org = await new_org()
    listed = await gql.data(PROJECTS, {"id": org.id}, token=org.token)
    project = listed["organization"]["projects"][0]["id"]
    first = {"org": org.id, "id": project, "name": "training", "key": "rename-1"}
    answer = await gql.data(RENAME, first, token=org.token)
    await gql.data(RENAME, {**first, "name": "inference", "key": None}, token=org.token)
    assert await gql.data(RENAME, first, token=org.token) == answer
    listed = await gql.data(PROJECTS, {"id": org.id}, token=org.token)
    assert {"id": project, "name": "inference"} in listed["organization"]["projects"]
    error = await gql.error(RENAME, {**first, "name": "other"}, token=org.token)
    assert error["extensions"]["code"] == "CONFLICT"
    assert error["extensions"]["field"] == "idempotencyKey"


async def test_a_keyed_threshold_retry_is_the_same_request_whatever_changed_since(
    gql, new_org
) -> None:
    """The wallet merges the thresholds given with those stored, so a retry sends what the first
    call sent (not the first call merged with what is stored by then) and gets its answer."""
    org = await new_org()
    first = {"org": org.id, "warning": "50", "key": "warn-1"}
    answer = await gql.data(THRESHOLDS, first, token=org.token)
    await gql.data(THRESHOLDS, {"org": org.id, "critical": "20"}, token=org.token)
    assert await gql.data(THRESHOLDS, first, token=org.token) == answer
    now = await gql.data(THRESHOLDS, {"org": org.id}, token=org.token)
    assert now["setLowBalanceThresholds"] == {
        "warningAmount": {"amount": "50.000000"},
        "criticalAmount": {"amount": "20.000000"},
    }
