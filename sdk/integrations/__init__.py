"""Integrations with web frameworks and job queues; each is an optional extra.

- :mod:`sdk.integrations.starlette`: FastAPI and Starlette (``cancel-broker[fastapi]``)
- :mod:`sdk.integrations.celery`: Celery tasks as runs (``cancel-broker[celery]``)
- :mod:`sdk.integrations.arq`: arq jobs as runs (``cancel-broker[arq]``)

Synchronous apps (Django, Flask, scripts) need no integration: :class:`sdk.SyncClient`.
"""
