"""Entry point of the ``web`` process (``wsgi:app``) and of Celery (``wsgi:celery_app``)."""

from eventflow import create_app

app = create_app()
celery_app = app.extensions["celery"]
