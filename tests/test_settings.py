"""Configuration comes from the environment, and a bad value stops the process clearly."""

from __future__ import annotations

import hashlib

import pytest

from eventflow.settings import ConfigError, RateLimit, Settings


def test_the_defaults_are_the_contracts() -> None:
    settings = Settings.from_env({})
    assert settings.redis_url == "redis://localhost:6379/0"
    assert (settings.smtp.host, settings.smtp.port) == ("localhost", 8025)
    assert settings.mail_from == "EventFlow <noreply@localhost>"
    assert settings.api_rate_limit == RateLimit(6000, 60)
    assert settings.rate_limit == RateLimit(20, 86400)
    assert (settings.max_retries, settings.retry_backoff, settings.retry_backoff_max) == (5, 2, 600)
    assert settings.visibility_timeout == 300
    assert settings.api_keys == ()
    assert settings.mail_domain == "localhost"
    assert settings.suppression_ttl == 90 * 86400
    assert settings.bounce_address is None


def test_the_bounce_address_tags_each_envelope_sender_with_the_event() -> None:
    from eventflow.settings import verp_address

    settings = Settings.from_env({"EVENTFLOW_BOUNCE_ADDRESS": "Bounces@Example.com"})
    assert settings.bounce_address == "Bounces@example.com"
    assert verp_address(settings.bounce_address, "e-1") == "Bounces+e-1@example.com"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EVENTFLOW_RATE_LIMIT", "20/fortnight"),
        ("EVENTFLOW_RATE_LIMIT", "0/day"),
        ("EVENTFLOW_MAX_RETRIES", "many"),
        ("EVENTFLOW_MAX_RETRIES", "-1"),
        ("EVENTFLOW_RETRY_BACKOFF", "nan"),
        ("EVENTFLOW_VISIBILITY_TIMEOUT", "0"),
        ("REDIS_URL", "http://localhost"),
        ("SMTP_URL", "ftp://mail"),
        ("SMTP_URL", "smtp://mail?starttls=true&bogus=1"),
        ("MAIL_FROM", "nobody"),
        ("EVENTFLOW_API_KEYS", "short"),
        ("EVENTFLOW_ADMIN_KEYS", "ops:sha256:abc"),
        ("EVENTFLOW_SUPPRESSION_TTL", "90 days"),
        ("EVENTFLOW_SUPPRESSION_TTL", "10s"),
        ("EVENTFLOW_BOUNCE_ADDRESS", "bounces"),
        ("EVENTFLOW_BOUNCE_ADDRESS", "bounces+x@example.com"),
        ("EVENTFLOW_BOUNCE_ADDRESS", "a-local-part-far-too-long-for-verp@example.com"),
    ],
)
def test_a_bad_value_is_refused_with_a_message_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({variable: value})
    assert str(refused.value).startswith(f"{variable}: ")


def test_a_retry_that_could_outwait_the_visibility_timeout_is_refused() -> None:
    # 10 retries from 2 s reach a 600 s ceiling, beyond a 300 s visibility timeout.
    with pytest.raises(ConfigError, match="EVENTFLOW_RETRY_BACKOFF_MAX"):
        Settings.from_env({"EVENTFLOW_MAX_RETRIES": "10", "EVENTFLOW_RETRY_BACKOFF_MAX": "600"})
    # Left unset, the ceiling follows the visibility timeout instead of refusing.
    assert Settings.from_env({"EVENTFLOW_MAX_RETRIES": "10"}).longest_backoff == 150
    settings = Settings.from_env({"EVENTFLOW_MAX_RETRIES": "10", "EVENTFLOW_RETRY_BACKOFF_MAX": "250"})
    assert settings.longest_backoff == 250


@pytest.mark.parametrize("visibility_timeout", ["1", "4", "30", "39", "41", "100"])
def test_a_short_visibility_timeout_alone_never_stops_the_process(visibility_timeout: str) -> None:
    # Given only a visibility timeout, the settings that must fit inside it follow it.
    settings = Settings.from_env({"EVENTFLOW_VISIBILITY_TIMEOUT": visibility_timeout})
    seconds = int(visibility_timeout)
    assert settings.smtp_timeout == min(10, seconds / 4)
    assert settings.retry_backoff_max == (600 if seconds > 32 else seconds / 2)
    assert settings.longest_backoff < seconds


def test_an_smtp_timeout_the_user_chose_too_long_is_refused_with_both_values() -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"EVENTFLOW_VISIBILITY_TIMEOUT": "30", "EVENTFLOW_SMTP_TIMEOUT": "10"})
    message = str(refused.value)
    assert message.startswith("EVENTFLOW_SMTP_TIMEOUT: ")
    assert "10s" in message and "EVENTFLOW_VISIBILITY_TIMEOUT=30" in message and "7.5s" in message
    # At most a quarter is allowed, the quarter included.
    settings = Settings.from_env({"EVENTFLOW_VISIBILITY_TIMEOUT": "30", "EVENTFLOW_SMTP_TIMEOUT": "7.5"})
    assert settings.smtp_timeout == 7.5


def test_a_retry_ceiling_the_user_chose_too_long_names_every_value_involved() -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"EVENTFLOW_VISIBILITY_TIMEOUT": "30",
                           "EVENTFLOW_RETRY_BACKOFF_MAX": "600"})
    message = str(refused.value)
    assert message.startswith("EVENTFLOW_RETRY_BACKOFF_MAX: ")
    assert "(32s" in message and "EVENTFLOW_VISIBILITY_TIMEOUT=30" in message
    assert "below 30s" in message


def test_rate_limits_take_every_unit_of_the_contract() -> None:
    for text, seconds in [("5/second", 1), ("5/minute", 60), ("5/hour", 3600), ("5/day", 86400)]:
        assert Settings.from_env({"EVENTFLOW_RATE_LIMIT": text}).rate_limit == RateLimit(5, seconds)


def test_keys_are_given_plainly_or_as_named_sha256_digests() -> None:
    digest = hashlib.sha256(b"a-very-secret-key-123").hexdigest()
    settings = Settings.from_env({
        "EVENTFLOW_API_KEYS": f"plain-key-0123456789abc,billing:sha256:{digest}",
        "EVENTFLOW_ADMIN_KEYS": "admin-key-0123456789abcdef",
    })
    names = {key.name: key.admin for key in settings.api_keys}
    assert names["billing"] is False
    assert sum(admin for admin in names.values()) == 1
    assert "a-very-secret-key-123" not in repr(settings)


def test_credentials_over_plain_smtp_are_refused_unless_allowed() -> None:
    with pytest.raises(ConfigError, match="without TLS"):
        Settings.from_env({"SMTP_URL": "smtp://user:pass@mail.example.com:587"})
    smtp = Settings.from_env({"SMTP_URL": "smtp://user:p%40ss@mail.example.com:587?starttls=true"}).smtp
    assert (smtp.username, smtp.password, smtp.starttls, smtp.verify) == ("user", "p@ss", True, True)
    assert "p@ss" not in repr(smtp) and "p@ss" not in smtp.describe()
    assert Settings.from_env({"SMTP_URL": "smtps://mail.example.com"}).smtp.port == 465


def test_the_event_retention_takes_the_purge_commands_units() -> None:
    assert Settings.from_env({}).event_retention == 8 * 86400
    for text, seconds in [("90m", 5400), ("12h", 43200), ("30d", 30 * 86400), ("2w", 14 * 86400)]:
        assert Settings.from_env({"EVENTFLOW_EVENT_RETENTION": text}).event_retention == seconds
    for bad in ("8", "8 days", "0s", "-1d"):
        with pytest.raises(ConfigError, match="^EVENTFLOW_EVENT_RETENTION: "):
            Settings.from_env({"EVENTFLOW_EVENT_RETENTION": bad})
