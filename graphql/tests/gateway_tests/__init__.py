"""The gateway's tests, a package of their own on purpose.

pytest (importlib mode) names a test module by its path from the repository root, so a module
loose in graphql/tests/ would be imported as `graphql.tests.<name>`, creating a `graphql` module
that shadows graphql-core. Inside this package the modules are `gateway_tests.<name>` instead:
put new gateway tests here.
"""
