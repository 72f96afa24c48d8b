"""Helpers of the test suite, imported by test modules (``from tests.support.payloads import ...``).

conftest.py files define fixtures only; whatever a test module needs besides fixtures lives here:
``data`` (the tiny synthetic dataset and models), ``payloads`` (the API key, item payloads), ``servers``
(in-process and real servers), ``backfill_api`` (driving backfill jobs over HTTP), ``fuzz`` (schemathesis
calls routed to an in-process server).
"""
