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
# Each pool process keeps up to 4 messages in hand, taken but not acknowledged (acks
# late): they are restored to the queue on a warm/soft shutdown, or after the visibility
# timeout if the worker is killed; a copy run twice is stopped by the event's claim and
# ledger. 1 would cost a Redis round trip between every two tasks (bench/README.md).
worker_prefetch_multiplier = 4

# Delivery state lives in EventFlow's own records; Celery's result backend is not needed.
task_ignore_result = True
result_backend = None

task_default_queue = "celery"
task_time_limit = 120
task_soft_time_limit = 90

broker_connection_retry_on_startup = True
broker_connection_max_retries = None
# A broker error reply (a full Redis's -OOM while the consumer declares its queues, a
# replica's -READONLY during a failover) restarts the consumer, as a lost connection does,
# instead of stopping the worker for good ("Unrecoverable error"). eventflow/broker.py
# keeps the running consumer from failing on a full Redis at all.
broker_channel_error_retry = True
# Task events (task-received/started/succeeded) are published only while Flower asks
# for them: Flower sends "enable_events" to the workers every few seconds (its default),
# and without it they would cost every worker three Redis publishes per task, about half
# of the worker's main process's time, for no reader.
worker_send_task_events = False
task_send_sent_event = False
worker_hijack_root_logger = False
worker_cancel_long_running_tasks_on_connection_loss = False

