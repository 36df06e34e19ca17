"""Prefect orchestration of the galip pipeline (thin tasks over the `galip` command line)."""
