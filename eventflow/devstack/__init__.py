"""The development stack: Redis, an SMTP inbox, and the Procfile under one supervisor.

Nothing here runs in production; ``make run`` and ``make test`` use it.
"""
