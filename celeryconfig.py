"""Celery settings that do not depend on the environment.

The broker URL and the visibility timeout come from ``eventflow.settings`` and are set
in :func:`eventflow.celery_app.celery_init_app`.
"""

# JSON only: a pickled message from a compromised producer would run code in the worker.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
event_serializer = "json"

# A message is acknowledged only after the task has finished with it, and a message whose
# worker process died is handed out again rather than dropped.
task_acks_late = True
task_reject_on_worker_lost = True
task_acks_on_failure = True
task_acks_on_timeout = True
worker_prefetch_multiplier = 1

# Delivery state lives in EventFlow's own records; Celery's result backend is not needed.
task_ignore_result = True
result_backend = None

task_default_queue = "celery"
task_time_limit = 120
task_soft_time_limit = 90

broker_connection_retry_on_startup = True
broker_connection_max_retries = None
worker_send_task_events = True
task_send_sent_event = False
worker_hijack_root_logger = False
worker_cancel_long_running_tasks_on_connection_loss = False

