"""Dev tooling: mock providers, the local dev stack, its Envoy bootstrap and process helpers.

No product module imports this package (import-linter checks it); only the `dev` subcommand,
the tests and the bench do. It is excluded from the container image.
"""
