"""Celery tasks of EventFlow (declared with ``@shared_task``)."""

from tasks import delivery  # noqa: F401
