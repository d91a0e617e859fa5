"""The code's own layout: the Lua scripts beside their code speak the statuses and steps of
``eventflow/statuses.py``, and each loads and compiles on a real Redis."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis

from eventflow.statuses import Status, Step

PACKAGE = Path(__file__).resolve().parent.parent / "eventflow"
LUA_FILES = sorted(PACKAGE.rglob("*.lua"))


def test_the_scripts_are_lua_files_beside_their_code() -> None:
    names = {path.relative_to(PACKAGE).as_posix() for path in LUA_FILES}
    assert {"gcra.lua", "throttle.lua", "store/accept.lua", "store/take.lua",
            "store/delivered.lua", "deadletters/dead_letter.lua",
            "deadletters/replay.lua"} <= names


@pytest.mark.parametrize("path", LUA_FILES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_every_status_and_step_a_script_writes_is_one_of_the_enums(path: Path) -> None:
    # (reads name fields, 'status', 'user_id': only what is written or compared counts)
    text = "\n".join(line for line in path.read_text().splitlines() if "HMGET" not in line)
    written = set(re.findall(r"'status', '([a-z_]+)'", text))
    compared = set(re.findall(r"status == '([a-z_]+)'", text))
    noted = set(re.findall(r"note\('([a-z_]+)'", text))
    assert written | compared <= set(Status)
    assert noted <= set(Step)


def test_every_script_compiles_on_redis(redis_client: redis.Redis) -> None:
    from eventflow import suppressions
    from eventflow.deadletters import operations, record
    from eventflow.store import intake, ledger
    from eventflow.throttle import _GCRA
    from eventflow.webhooks import SLOT

    scripts = [_GCRA, intake.ACCEPT, intake.ACCEPT_BATCH, ledger.TAKE, ledger.DELIVERED,
               ledger.FAILED_ATTEMPT, ledger.RATE_LIMITED, ledger.SUPPRESSED, ledger.BOUNCED,
               suppressions.ADD, ledger.EXTEND_LEASE,
               ledger.REQUEUE_STALLED, record.DEAD_LETTER, operations.PAGE,
               operations.RESERVE_SLOTS, operations.REPLAY, operations.DELETE,
               operations.PURGE, operations.REFUSE, SLOT]
    for source in scripts:
        assert re.fullmatch("[0-9a-f]{40}", redis_client.script_load(source))
