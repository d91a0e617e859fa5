"""Celery tasks of EventFlow (declared with ``@shared_task``)."""

from tasks import delivery, webhooks  # noqa: F401
