"""Every setting EventFlow reads, taken from the environment in one place.

A bad value stops the process at start-up with a one-line message that names the
variable, rather than failing later in the middle of a delivery.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

#: Units accepted in ``N/unit`` rate limits, in seconds.
RATE_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}

#: Units of a duration (``EVENTFLOW_EVENT_RETENTION``, ``flask dlq purge --older-than``).
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour|day)s?\s*$", re.IGNORECASE)
_HEX64_RE = re.compile(r"^[0-9a-fA-F]{64}$")

#: The SMTP timeout when none is set: 10 s, or less under a short visibility timeout.
SMTP_TIMEOUT = 10.0
#: The largest share of the visibility timeout one SMTP timeout may take: a send passes
#: through several timed steps (connect, each command, DATA) and must end well before the
#: message is handed to another worker.
SMTP_TIMEOUT_SHARE = 0.25
#: The retry ceiling when none is set: 600 s, or half the visibility timeout when 600 s
#: would let the longest retry wait reach it (so that a wait and its send fit the lease).
RETRY_BACKOFF_MAX = 600.0
RETRY_BACKOFF_MAX_SHARE = 0.5


class ConfigError(ValueError):
    """A variable of the environment has a value EventFlow cannot run with."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True)
class RateLimit:
    """``count`` events per ``seconds``-long moving window."""

    count: int
    seconds: int

    def __str__(self) -> str:
        unit = next(name for name, secs in RATE_UNITS.items() if secs == self.seconds)
        return f"{self.count}/{unit}"


@dataclass(frozen=True)
class ApiKey:
    """A configured key: its name (recorded on events) and the SHA-256 of its secret."""

    name: str
    digest: bytes = field(repr=False)
    admin: bool = False


@dataclass(frozen=True)
class Webhook:
    """A producer key's status callback: where its events' final statuses are POSTed,
    and the Standard Webhooks secret (``whsec_...``) that signs them."""

    key_name: str
    url: str
    secret: str = field(repr=False)


@dataclass(frozen=True)
class SmtpSettings:
    """Where and how to reach the SMTP server."""

    host: str
    port: int
    implicit_tls: bool = False
    starttls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    verify: bool = True
    allow_insecure_auth: bool = False

    def describe(self) -> str:
        """The server as safe to print: no credentials."""
        scheme = "smtps" if self.implicit_tls else "smtp"
        tls = "?starttls=true" if self.starttls else ""
        return f"{scheme}://{self.host}:{self.port}{tls}"


@dataclass(frozen=True)
class Settings:
    """The whole configuration of a web, worker or flower process."""

    redis_url: str = "redis://localhost:6379/0"
    smtp: SmtpSettings = field(default_factory=lambda: SmtpSettings("localhost", 8025))
    mail_from: str = "EventFlow <noreply@localhost>"
    api_keys: tuple[ApiKey, ...] = ()
    api_rate_limit: RateLimit = RateLimit(6000, 60)
    rate_limit: RateLimit = RateLimit(20, 86400)
    max_retries: int = 5
    retry_backoff: float = 2.0
    retry_backoff_max: float = 600.0
    visibility_timeout: int = 300
    smtp_timeout: float = 10.0
    max_worker_losses: int = 3
    replay_rate: float = 50.0
    worker_shutdown_timeout: float = 10.0
    strict_redis: bool = False
    allow_special_use_domains: bool = False
    event_retention: int = 8 * 86400
    #: Peers whose X-Forwarded-For/-Proto the web process believes (a PaaS router).
    forwarded_allow_ips: str = "127.0.0.1"
    sentinel_master: str = "mymaster"
    redis_min_replicas: int = 0
    #: The operator's email templates (``None``: the shipped ones).
    templates_dir: str | None = None
    #: How long a hard bounce keeps its address on the suppression list, in seconds.
    suppression_ttl: int = 90 * 86400
    #: The envelope sender bounces go to (``None``: ``MAIL_FROM``'s address); each
    #: message goes out from ``local+<event id>@domain`` (VERP).
    bounce_address: str | None = None
    #: Status callbacks per producer key name (``EVENTFLOW_WEBHOOKS``).
    webhooks: tuple[Webhook, ...] = ()
    webhooks_allow_private: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build and validate the settings from ``environ`` (``os.environ`` by default)."""
        env = os.environ if environ is None else environ

        def get(name: str, default: str) -> str:
            value = env.get(name, "")
            return value.strip() if value.strip() else default

        visibility_timeout = parse_int(
            "EVENTFLOW_VISIBILITY_TIMEOUT", get("EVENTFLOW_VISIBILITY_TIMEOUT", "300"), 1
        )
        # Settings that must fit inside the visibility timeout default to what fits: a
        # default never stops the process; only a value the user chose can be refused.
        smtp_timeout = min(SMTP_TIMEOUT, visibility_timeout * SMTP_TIMEOUT_SHARE)
        api_keys = parse_keys("EVENTFLOW_API_KEYS", get("EVENTFLOW_API_KEYS", ""), admin=False)
        admin_keys = parse_keys(
            "EVENTFLOW_ADMIN_KEYS", get("EVENTFLOW_ADMIN_KEYS", ""), admin=True
        )
        allow_private = parse_bool(
            "EVENTFLOW_WEBHOOKS_ALLOW_PRIVATE", get("EVENTFLOW_WEBHOOKS_ALLOW_PRIVATE", "false")
        )
        webhooks = parse_webhooks(
            get("EVENTFLOW_WEBHOOKS", ""), get("EVENTFLOW_WEBHOOK_SECRETS", ""),
            {key.name for key in api_keys + admin_keys}, allow_private,
        )
        settings = cls(
            redis_url=parse_redis_url(get("REDIS_URL", cls.redis_url)),
            smtp=parse_smtp_url(get("SMTP_URL", "smtp://localhost:8025"), env),
            mail_from=parse_mail_from(get("MAIL_FROM", cls.mail_from)),
            api_keys=merge_keys(api_keys, admin_keys),
            api_rate_limit=parse_rate(
                "EVENTFLOW_API_RATE_LIMIT", get("EVENTFLOW_API_RATE_LIMIT", "6000/minute")
            ),
            rate_limit=parse_rate("EVENTFLOW_RATE_LIMIT", get("EVENTFLOW_RATE_LIMIT", "20/day")),
            max_retries=parse_int("EVENTFLOW_MAX_RETRIES", get("EVENTFLOW_MAX_RETRIES", "5"), 0, 100),
            retry_backoff=parse_float(
                "EVENTFLOW_RETRY_BACKOFF", get("EVENTFLOW_RETRY_BACKOFF", "2"), 0.0
            ),
            retry_backoff_max=parse_float(
                "EVENTFLOW_RETRY_BACKOFF_MAX", get("EVENTFLOW_RETRY_BACKOFF_MAX", "600"), 0.0
            ),
            visibility_timeout=visibility_timeout,
            smtp_timeout=parse_float(
                "EVENTFLOW_SMTP_TIMEOUT", get("EVENTFLOW_SMTP_TIMEOUT", f"{smtp_timeout!r}"), 0.1
            ),
            max_worker_losses=parse_int(
                "EVENTFLOW_MAX_WORKER_LOSSES", get("EVENTFLOW_MAX_WORKER_LOSSES", "3"), 1, 100
            ),
            replay_rate=parse_float(
                "EVENTFLOW_REPLAY_RATE", get("EVENTFLOW_REPLAY_RATE", "50"), 0.1
            ),
            worker_shutdown_timeout=parse_float(
                "EVENTFLOW_WORKER_SHUTDOWN_TIMEOUT",
                get("EVENTFLOW_WORKER_SHUTDOWN_TIMEOUT", "10"), 0.0,
            ),
            strict_redis=parse_bool(
                "EVENTFLOW_STRICT_REDIS", get("EVENTFLOW_STRICT_REDIS", "false")
            ),
            event_retention=parse_duration(
                "EVENTFLOW_EVENT_RETENTION", get("EVENTFLOW_EVENT_RETENTION", "8d"), 60
            ),
            allow_special_use_domains=parse_bool(
                "EVENTFLOW_ALLOW_SPECIAL_USE_DOMAINS",
                get("EVENTFLOW_ALLOW_SPECIAL_USE_DOMAINS", "false"),
            ),
            forwarded_allow_ips=parse_forwarded_allow_ips(
                "FORWARDED_ALLOW_IPS", get("FORWARDED_ALLOW_IPS", cls.forwarded_allow_ips)
            ),
            sentinel_master=parse_name(
                "EVENTFLOW_SENTINEL_MASTER", get("EVENTFLOW_SENTINEL_MASTER", cls.sentinel_master)
            ),
            redis_min_replicas=parse_int(
                "EVENTFLOW_REDIS_MIN_REPLICAS", get("EVENTFLOW_REDIS_MIN_REPLICAS", "0"), 0, 16
            ),
            templates_dir=parse_directory(
                "EVENTFLOW_TEMPLATES_DIR", get("EVENTFLOW_TEMPLATES_DIR", "")
            ),
            suppression_ttl=parse_duration(
                "EVENTFLOW_SUPPRESSION_TTL", get("EVENTFLOW_SUPPRESSION_TTL", "90d"), 60
            ),
            bounce_address=parse_bounce_address(
                "EVENTFLOW_BOUNCE_ADDRESS", get("EVENTFLOW_BOUNCE_ADDRESS", "")
            ),
            webhooks=tuple(webhooks.values()),
            webhooks_allow_private=allow_private,
        )
        if not env.get("EVENTFLOW_RETRY_BACKOFF_MAX", "").strip():
            settings = dataclasses.replace(settings, retry_backoff_max=settings.default_backoff_max)
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse combinations that would deliver twice or mislead."""
        if self.longest_backoff >= self.visibility_timeout:
            # A retry waits in the worker holding its message unacknowledged; if it waits
            # longer than the visibility timeout Redis hands the same message to another
            # worker and the email goes out twice. What counts is the longest wait that
            # can happen: the ceiling, or less when the retries run out before reaching it
            # (with the defaults, 2 s * 2**4 = 32 s, below the 600 s ceiling).
            raise ConfigError(
                "EVENTFLOW_RETRY_BACKOFF_MAX",
                f"the longest retry wait ({self.longest_backoff:g}s, from "
                f"EVENTFLOW_RETRY_BACKOFF={self.retry_backoff:g}, "
                f"EVENTFLOW_MAX_RETRIES={self.max_retries} and "
                f"EVENTFLOW_RETRY_BACKOFF_MAX={self.retry_backoff_max:g}) must be below "
                f"EVENTFLOW_VISIBILITY_TIMEOUT={self.visibility_timeout}; set "
                f"EVENTFLOW_RETRY_BACKOFF_MAX below {self.visibility_timeout}s (unset, it "
                f"is {self.default_backoff_max:g}s)",
            )
        largest_smtp_timeout = self.visibility_timeout * SMTP_TIMEOUT_SHARE
        if self.smtp_timeout > largest_smtp_timeout:
            raise ConfigError(
                "EVENTFLOW_SMTP_TIMEOUT",
                f"{self.smtp_timeout:g}s is too long for "
                f"EVENTFLOW_VISIBILITY_TIMEOUT={self.visibility_timeout}: at most a quarter "
                f"of it, {largest_smtp_timeout:g}s, is allowed",
            )

    @property
    def longest_backoff(self) -> float:
        """The longest wait before a retry that these settings allow."""
        return self.longest_backoff_under(self.retry_backoff_max)

    def longest_backoff_under(self, ceiling: float) -> float:
        """The longest wait before a retry with ``ceiling`` as the retry ceiling."""
        if self.max_retries == 0:
            return 0.0
        return min(ceiling, self.retry_backoff * 2 ** (self.max_retries - 1))

    @property
    def default_backoff_max(self) -> float:
        """``EVENTFLOW_RETRY_BACKOFF_MAX`` when unset: 600 s unless the longest wait would
        then reach the visibility timeout; half the visibility timeout in that case."""
        if self.longest_backoff_under(RETRY_BACKOFF_MAX) < self.visibility_timeout:
            return RETRY_BACKOFF_MAX
        return self.visibility_timeout * RETRY_BACKOFF_MAX_SHARE

    def webhook_for(self, key_name: str | None) -> Webhook | None:
        """The status callback of the producer key ``key_name``, if it has one."""
        return next((hook for hook in self.webhooks if hook.key_name == key_name), None)

    @property
    def mail_domain(self) -> str:
        """The domain of ``MAIL_FROM``, used in every ``Message-ID``."""
        from email.utils import parseaddr

        return parseaddr(self.mail_from)[1].rpartition("@")[2]


def parse_int(variable: str, raw: str, minimum: int, maximum: int | None = None) -> int:
    """An integer within bounds, or a :class:`ConfigError` naming ``variable``."""
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(variable, f"expected a whole number, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ConfigError(variable, f"must be {bounds}, got {value}")
    return value


def parse_float(variable: str, raw: str, minimum: float) -> float:
    """A number of seconds no smaller than ``minimum``."""
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(variable, f"expected a number of seconds, got {raw!r}") from None
    if not value >= minimum or value == float("inf"):
        raise ConfigError(variable, f"must be a finite number of at least {minimum:g}, got {raw}")
    return value


def parse_duration(variable: str, raw: str, minimum: int) -> int:
    """``30d``, ``12h``, ``90m``, ``45s`` or ``2w``, in whole seconds, at least ``minimum``."""
    match = DURATION_RE.match(raw)
    if not match:
        raise ConfigError(variable, f"expected a number and a unit (s, m, h, d, w), got {raw!r}")
    seconds = round(float(match.group(1)) * DURATION_UNITS[match.group(2)])
    if seconds < minimum:
        raise ConfigError(variable, f"must be at least {minimum}s, got {raw!r}")
    return seconds


def parse_bool(variable: str, raw: str) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``)."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(variable, f"expected true or false, got {raw!r}")


def parse_directory(variable: str, raw: str) -> str | None:
    """A directory that exists and can be read (``None`` when unset)."""
    if not raw:
        return None
    if not os.path.isdir(raw):
        raise ConfigError(variable, f"{raw!r} is not a directory")
    if not os.access(raw, os.R_OK | os.X_OK):
        raise ConfigError(variable, f"{raw!r} cannot be read by this process")
    return os.path.abspath(raw)


def parse_rate(variable: str, raw: str) -> RateLimit:
    """``N/second``, ``N/minute``, ``N/hour`` or ``N/day``."""
    match = _RATE_RE.match(raw)
    if not match or int(match.group(1)) < 1:
        raise ConfigError(
            variable, f"expected N/second, N/minute, N/hour or N/day with N >= 1, got {raw!r}"
        )
    return RateLimit(int(match.group(1)), RATE_UNITS[match.group(2).lower()])


def parse_redis_url(raw: str) -> str:
    """A ``redis://``, ``rediss://`` or ``unix://`` URL, or the Sentinels of kombu's form
    ``sentinel://[:password@]host:26379;sentinel://host2:26379/<db>``."""
    if urlsplit(raw).scheme == "sentinel":
        sentinel_addresses(raw)
    elif urlsplit(raw).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            "REDIS_URL", "expected a redis://, rediss:// or unix:// URL, or "
            "sentinel://host:26379;sentinel://host2:26379/<db> for Redis Sentinel",
        )
    return raw


@dataclass(frozen=True)
class SentinelAddress:
    """Where the Sentinels are, and what to ask the master they name for."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    password: str | None = field(default=None, repr=False)


def sentinel_addresses(raw: str) -> SentinelAddress:
    """The parts of a ``sentinel://...;sentinel://.../<db>`` URL (the password, if any, is
    the Redis master's; the database may be named on any part)."""
    sentinels, db, password = [], 0, None
    for part in raw.split(";"):
        parts = urlsplit(part.strip())
        try:
            port = parts.port or 26379
        except ValueError:
            raise ConfigError("REDIS_URL", f"the port of {parts.netloc!r} is not a number") from None
        if parts.scheme != "sentinel" or not parts.hostname:
            raise ConfigError("REDIS_URL", "each Sentinel must read sentinel://host[:port], "
                              "separated by ';'")
        sentinels.append((parts.hostname, port))
        password = unquote(parts.password) if parts.password else password
        if parts.path.strip("/"):
            if not parts.path.strip("/").isdigit():
                raise ConfigError("REDIS_URL", f"the database must be a number, got {parts.path!r}")
            db = int(parts.path.strip("/"))
    return SentinelAddress(tuple(sentinels), db, password)


def parse_name(variable: str, raw: str) -> str:
    """A name without spaces (a Sentinel master's, say)."""
    if not re.fullmatch(r"[\w.:-]{1,128}", raw):
        raise ConfigError(variable, f"expected a name of letters, digits, '.', ':', '_' or '-', "
                          f"got {raw!r}")
    return raw


def parse_smtp_url(raw: str, env: Mapping[str, str]) -> SmtpSettings:
    """``smtp://[user:pass@]host[:port][?starttls=true]`` or ``smtps://...``."""
    parts = urlsplit(raw)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ConfigError("SMTP_URL", "expected smtp://[user:pass@]host[:port] or smtps://...")
    query = {k: v[-1].lower() for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"starttls", "verify", "allow_insecure_auth"}
    if unknown:
        raise ConfigError("SMTP_URL", f"unknown option(s): {', '.join(sorted(unknown))}")
    flags = {k: v in ("1", "true", "yes", "on") for k, v in query.items()}
    implicit = parts.scheme == "smtps"
    try:
        port = parts.port or (465 if implicit else 25)
    except ValueError:
        raise ConfigError("SMTP_URL", "the port is not a number") from None
    smtp = SmtpSettings(
        host=parts.hostname,
        port=port,
        implicit_tls=implicit,
        starttls=flags.get("starttls", False) and not implicit,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        verify=flags.get("verify", True),
        allow_insecure_auth=flags.get("allow_insecure_auth", False),
    )
    if smtp.username and not (smtp.implicit_tls or smtp.starttls or smtp.allow_insecure_auth):
        raise ConfigError(
            "SMTP_URL",
            "credentials would be sent without TLS; use smtps://, ?starttls=true, "
            "or ?allow_insecure_auth=true for a trusted local relay",
        )
    return smtp


def parse_mail_from(raw: str) -> str:
    """A single address with an optional display name, and no line breaks."""
    from email.utils import parseaddr

    _, address = parseaddr(raw)
    if "\r" in raw or "\n" in raw or "@" not in address:
        raise ConfigError("MAIL_FROM", f"expected 'Name <address@domain>', got {raw!r}")
    return raw


def parse_bounce_address(variable: str, raw: str) -> str | None:
    """A plain address (``bounces@example.com``) whose local part can take ``+<event
    id>``, or ``None`` when empty."""
    if not raw:
        return None
    from email_validator import EmailNotValidError, validate_email

    try:
        address = validate_email(raw, check_deliverability=False, allow_smtputf8=False,
                                 test_environment=True).normalized
    except EmailNotValidError as exc:
        raise ConfigError(variable, f"expected an address such as bounces@example.com: {exc}"
                          ) from None
    local = address.rpartition("@")[0]
    if "+" in local or local.startswith('"') or len(local) > 64 - 37:
        raise ConfigError(variable, "the local part must be plain, without '+' and at most "
                          "27 characters, so that '+<event id>' can be added to it")
    return address


def verp_address(bounce_address: str, event_id: str) -> str:
    """The envelope sender of one event's message: ``local+<event id>@domain``."""
    local, _, domain = bounce_address.rpartition("@")
    return f"{local}+{event_id}@{domain}"


def parse_keys(variable: str, raw: str, *, admin: bool) -> tuple[ApiKey, ...]:
    """Comma-separated keys, each the secret itself or ``name:sha256:<hex>``."""
    keys = []
    for position, item in enumerate(filter(None, (s.strip() for s in raw.split(","))), 1):
        name, sep, rest = item.partition(":sha256:")
        if sep:
            if not name or not _HEX64_RE.match(rest):
                raise ConfigError(
                    variable, f"entry {position} should be name:sha256:<64 hex digits>"
                )
            keys.append(ApiKey(name, bytes.fromhex(rest), admin))
        else:
            if len(item) < 16:
                raise ConfigError(variable, f"entry {position} is shorter than 16 characters")
            digest = hashlib.sha256(item.encode()).digest()
            keys.append(ApiKey(f"key-{digest.hex()[:8]}", digest, admin))
    return tuple(keys)


def merge_keys(producers: tuple[ApiKey, ...], admins: tuple[ApiKey, ...]) -> tuple[ApiKey, ...]:
    """Admin keys win where the same secret is listed twice."""
    admin_digests = {key.digest for key in admins}
    return admins + tuple(key for key in producers if key.digest not in admin_digests)


def parse_forwarded_allow_ips(variable: str, value: str) -> str:
    """``*`` or a comma-separated list of addresses and networks (``10.0.0.0/8``), the
    form gunicorn's variable of the same name takes."""
    if value == "*":
        return value
    for position, entry in enumerate(value.split(","), 1):
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise ConfigError(
                variable, f"entry {position} ({entry.strip()!r}) should be an IP address, "
                "a network such as 10.0.0.0/8, or the whole value '*'"
            ) from None
    return value


def parse_webhooks(
    urls: str, secrets: str, key_names: set[str], allow_private: bool,
) -> dict[str, Webhook]:
    """``EVENTFLOW_WEBHOOKS`` (``name=url,...``) with ``EVENTFLOW_WEBHOOK_SECRETS``
    (``name=whsec_...,...``): one callback per producer key name, each with its secret.

    A URL whose host is a literal private or loopback address is refused here unless
    ``allow_private``; a host name is checked each time it is resolved, at send time.
    """
    from standardwebhooks.webhooks import Webhook as Signer

    from eventflow.webhooks import address_allowed

    found = _name_values("EVENTFLOW_WEBHOOKS", urls)
    keys = _name_values("EVENTFLOW_WEBHOOK_SECRETS", secrets)
    webhooks = {}
    for name, url in found.items():
        if name not in key_names:
            raise ConfigError("EVENTFLOW_WEBHOOKS", f"{name!r} is not the name of a key of "
                              "EVENTFLOW_API_KEYS or EVENTFLOW_ADMIN_KEYS")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("EVENTFLOW_WEBHOOKS", f"the URL of {name!r} should be "
                              "https://host/path (or http://)")
        try:
            parts.port  # noqa: B018 (raises on a bad port)
            literal = ipaddress.ip_address(parts.hostname)
        except ValueError as exc:
            if "port" in str(exc).lower():
                raise ConfigError("EVENTFLOW_WEBHOOKS", f"the URL of {name!r} has a bad "
                                  "port") from None
            literal = None
        if not allow_private and literal is not None and not address_allowed(literal):
            raise ConfigError("EVENTFLOW_WEBHOOKS", f"the URL of {name!r} is on a private or "
                              "loopback address; set EVENTFLOW_WEBHOOKS_ALLOW_PRIVATE=true "
                              "to allow it")
        secret = keys.get(name)
        if not secret:
            raise ConfigError("EVENTFLOW_WEBHOOK_SECRETS", f"no secret for {name!r}, which "
                              "has a URL in EVENTFLOW_WEBHOOKS")
        try:
            Signer(secret)
        except Exception:  # noqa: BLE001 (the library raises base64's errors as they come)
            raise ConfigError("EVENTFLOW_WEBHOOK_SECRETS", f"the secret of {name!r} should "
                              "be whsec_ followed by base64") from None
        webhooks[name] = Webhook(name, url, secret)
    extra = sorted(set(keys) - set(found))
    if extra:
        raise ConfigError("EVENTFLOW_WEBHOOK_SECRETS", f"{extra[0]!r} has a secret but no URL "
                          "in EVENTFLOW_WEBHOOKS")
    return webhooks


def _name_values(variable: str, raw: str) -> dict[str, str]:
    """``name=value,...`` as a mapping; values are never printed (they may be secrets)."""
    values: dict[str, str] = {}
    for position, item in enumerate(filter(None, (s.strip() for s in raw.split(","))), 1):
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise ConfigError(variable, f"entry {position} should be keyname=value")
        if name in values:
            raise ConfigError(variable, f"{name!r} is listed twice")
        values[name] = value
    return values
