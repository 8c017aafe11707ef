"""Shared plumbing of every gpudeck service: configuration, logs, PostgreSQL, events, gRPC.

The kit knows no domain: it never names an organization, a pod or a wallet.
"""
