"""Dev tooling: mock providers, the local dev stack, its Envoy bootstrap and process helpers.

- ``devstack``: ``holysheep-mesh dev`` (and ``--demo``); ``envoy_bootstrap``: its Envoy config.
- ``mock_provider``: the mock OpenAI/Anthropic upstream (in-process, threaded or its own process).
- ``processes``: free ports, bounded waits, the wheel's Envoy and redis-server, and the process
  wrappers (ExtProc, Envoy, RedisServer, MockProviderProcess) every launcher uses.
- ``stack``: mocks + ext_proc(s) + a real Envoy on loopback, the one stack the tests (with their
  leak guard, tests/harness.py) and the bench (bench/stack.py, bench/chaos.py) share.

No product module imports this package (import-linter checks it); only the `dev` subcommand,
the tests and the bench do. It is excluded from the container image (.dockerignore).
"""
