"""Email templates: a subject, a text body and an optional HTML body per event type.

Templates are Jinja2, rendered in its sandbox (``SandboxedEnvironment``: no attribute of
Python's internals is reachable from a template) with ``StrictUndefined`` (a variable the
event does not carry is an error, never an empty hole in an email). They live under
``EVENTFLOW_TEMPLATES_DIR`` as::

    <EVENT_TYPE>/subject.txt        one line
    <EVENT_TYPE>/body.txt           the plain-text part
    <EVENT_TYPE>/body.html          optional: the HTML part (autoescaped, CSS inlined)
    <EVENT_TYPE>/<locale>/...       a locale's own files (fr-CA, then fr, then the above)
    <EVENT_TYPE>/sample.json        optional: {"data", "payload", "locale"} for `templates check`
    _layouts/..., anything else     shared layouts and partials ({% extends %}, {% include %})

An event type without a directory there uses the shipped one (``eventflow/templates/email``);
a shared name (a layout) is looked up in the operator's directory first, then in the
shipped one, so an operator's template may extend the shipped layout.

A template sees the keys of ``payload.data`` as variables, plus ``event`` (``id``,
``user_id``, ``event_type``, ``locale``) and ``payload`` (as sent).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import css_inline
from jinja2 import (
    BaseLoader,
    Environment,
    StrictUndefined,
    TemplateError,
    TemplateNotFound,
    TemplatesNotFound,
    TemplateSyntaxError,
    Undefined,
    UndefinedError,
    meta,
    select_autoescape,
)
from jinja2.loaders import split_template_path
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import missing
from marshmallow import ValidationError

from eventflow.failures import DeliveryFailed
from eventflow.headers import reject_header_breaks

#: Known event types and the subject used when the payload gives none.
DEFAULT_SUBJECTS = {
    "USER_NOTIFICATION": "You have a new notification",
    "USER_SIGNUP": "Welcome!",
    "PASSWORD_RESET": "Reset your password",
    "SECURITY_ALERT": "Security alert for your account",
    "ORDER_CONFIRMATION": "Your order is confirmed",
}


#: The templates shipped with EventFlow: the default of ``EVENTFLOW_TEMPLATES_DIR``.
SHIPPED_DIR = Path(__file__).parent / "templates" / "email"
#: The files of one event type's template, in the order they are rendered.
PARTS = ("subject.txt", "body.txt", "body.html")
#: A template's own sample data, for ``flask templates check``.
SAMPLE_FILE = "sample.json"
#: Largest ``payload.data``, serialized as compact JSON (UTF-8 bytes).
MAX_DATA_BYTES = 16 * 1024
#: Largest rendered message (subject, text and HTML, UTF-8 bytes): refused beyond.
MAX_RENDERED_BYTES = 256 * 1024
#: Longest rendered subject, in characters.
MAX_SUBJECT_CHARS = 998
#: Names a template sees besides the keys of ``data`` (so ``data`` may not use them).
RESERVED_NAMES = ("event", "payload")
#: Length of the version written to the history: a hash of the template's files.
VERSION_CHARS = 12

#: A BCP 47 language tag, as far as templates need: language, script, region, variants.
LOCALE_PATTERN = (r"^[A-Za-z]{2,3}(-[A-Za-z]{4})?(-([A-Za-z]{2}|[0-9]{3}))?"
                  r"(-([A-Za-z0-9]{5,8}|[0-9][A-Za-z0-9]{3}))*$")
_LOCALE_RE = re.compile(LOCALE_PATTERN)
MAX_LOCALE = 35


class TemplateFailed(DeliveryFailed):
    """An event's template does not render with its data.

    At the door it is a ``422`` (``field`` says where: ``data``, or the payload field the
    template needs); at send time a permanent failure, dead-lettered as ``template_error``.
    """

    def __init__(self, error: str, field: str = "data") -> None:
        super().__init__("template_error", error)
        self.args = (error, field)  # as the constructor takes them, so it pickles
        self.field = field

    def errors(self) -> dict[str, Any]:
        """The ``errors`` member of the 422 problem document."""
        return {"payload": {self.field: [self.error]}}


def canonical_locale(tag: str) -> str:
    """``fr-ca`` as ``fr-CA``, ``zh-hant-tw`` as ``zh-Hant-TW``: the directory's name."""
    parts = tag.replace("_", "-").split("-")
    out = [parts[0].lower()]
    for part in parts[1:]:
        if len(part) == 4 and part.isalpha():
            out.append(part.title())
        elif len(part) == 2 and part.isalpha() or len(part) == 3 and part.isdigit():
            out.append(part.upper())
        else:
            out.append(part.lower())
    return "-".join(out)


def locale_chain(tag: str | None) -> list[str]:
    """The locales to look in, most specific first: ``fr-CA`` gives ``["fr-CA", "fr"]``."""
    if not tag:
        return []
    parts = canonical_locale(tag).split("-")
    return ["-".join(parts[:n]) for n in range(len(parts), 0, -1)]


def check_locale(value: str) -> None:
    """Marshmallow validator: a BCP 47 tag."""
    if len(value) > MAX_LOCALE or not _LOCALE_RE.match(value):
        raise ValidationError("Not a BCP 47 language tag (such as 'fr' or 'fr-CA').")


def check_data(value: Mapping[str, Any]) -> None:
    """Marshmallow validator: JSON values only, at most 16 KiB, no reserved name."""
    try:
        size = len(json.dumps(value, separators=(",", ":"), allow_nan=False,
                              ensure_ascii=False).encode())
    except (ValueError, TypeError):
        raise ValidationError("Must hold JSON values only (no NaN or Infinity).") from None
    if size > MAX_DATA_BYTES:
        raise ValidationError(f"Must be at most {MAX_DATA_BYTES} bytes as JSON, not {size}.")
    reserved = sorted(set(value) & set(RESERVED_NAMES))
    if reserved:
        raise ValidationError(f"{', '.join(map(repr, reserved))}: reserved for the "
                              "template's own variables.")


# -- loading -----------------------------------------------------------------------------


class TemplateLoader(BaseLoader):
    """Finds a template in the operator's directory or the shipped one, and remembers a
    digest of each source it read (for the version written to the history)."""

    def __init__(self, own: Path | None, shipped: Path, event_types: Iterable[str]) -> None:
        self.own = own
        self.shipped = shipped
        self.event_types = frozenset(event_types)
        #: name -> (digest of its source, names it extends, includes or imports)
        self.digests: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    def roots(self, name: str) -> list[Path]:
        """Where ``name`` is looked for: an event type's files in one directory only."""
        head = name.split("/", 1)[0]
        if head in self.event_types:
            if self.own is not None and (self.own / head).is_dir():
                return [self.own]
            return [self.shipped]
        return [root for root in (self.own, self.shipped) if root is not None]

    def get_source(self, environment: Environment, template: str
                   ) -> tuple[str, str, Callable[[], bool]]:
        pieces = split_template_path(template)
        roots = self.roots(template)
        for root in roots:
            path = root.joinpath(*pieces)
            try:
                mtime = path.stat().st_mtime_ns
                source = path.read_text("utf-8")
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            try:
                deps = tuple(name for name in meta.find_referenced_templates(
                    environment.parse(source)) if name)
            except TemplateError:
                deps = ()  # the compiler reports the error with its line
            with self._lock:
                self.digests[template] = (hashlib.sha256(source.encode()).hexdigest(), deps)

            def uptodate(path: Path = path, mtime: int = mtime,
                         roots: list[Path] = roots) -> bool:
                try:
                    return path.stat().st_mtime_ns == mtime and self.roots(template) == roots
                except OSError:
                    return False

            return source, str(path), uptodate
        raise TemplateNotFound(template)

    def version(self, names: Iterable[str]) -> str:
        """A short hash of the sources of ``names`` and of every template they use."""
        seen: dict[str, str] = {}
        todo = list(names)
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            digest, deps = self.digests.get(name, ("", ()))
            seen[name] = digest
            todo.extend(deps)
        blob = "\n".join(f"{name}:{digest}" for name, digest in sorted(seen.items()))
        return hashlib.sha256(blob.encode()).hexdigest()[:VERSION_CHARS]

    def list_templates(self) -> list[str]:
        found: set[str] = set()
        for root in (self.own, self.shipped):
            if root is None or not root.is_dir():
                continue
            for path in root.rglob("*"):
                if path.is_file():
                    found.add(path.relative_to(root).as_posix())
        return sorted(found)


# -- rendering ---------------------------------------------------------------------------


class MissingVariable(UndefinedError):
    """A template used a variable (or a key of one) that the event does not carry."""

    def __init__(self, message: str, name: Any, owner: Any) -> None:
        super().__init__(message)
        self.name = name
        self.owner = owner


class _StrictUndefined(StrictUndefined):
    """``StrictUndefined`` that says which name was missing and in what."""

    __slots__ = ()

    def _fail_with_undefined_error(self, *args: Any, **kwargs: Any) -> Any:
        if self._undefined_exception is UndefinedError and self._undefined_hint is None:
            raise MissingVariable(self._undefined_message, self._undefined_name,
                                  self._undefined_obj)
        return super()._fail_with_undefined_error(*args, **kwargs)



# Undefined's operators are bound to its own method, not to the override: bind them again.
for _name in dir(StrictUndefined):
    if getattr(StrictUndefined, _name) is Undefined._fail_with_undefined_error \
            and _name != "_fail_with_undefined_error":
        setattr(_StrictUndefined, _name, _StrictUndefined._fail_with_undefined_error)


@dataclass(frozen=True)
class Rendered:
    """An event's email, rendered: what goes out, and which template made it."""

    subject: str
    text: str
    html: str | None
    template: str
    locale: str | None
    version: str

    def describe(self) -> dict[str, Any]:
        """What the history records: the template, its locale and its version."""
        return {"template": self.template, "locale": self.locale,
                "template_version": self.version}

    def as_dict(self) -> dict[str, Any]:
        """The preview's answer."""
        return {"subject": self.subject, "text": self.text, "html": self.html,
                **self.describe()}


def _inliner() -> css_inline.CSSInliner:
    # Nothing fetched from the network or read from disk on a template's behalf.
    return css_inline.CSSInliner(load_remote_stylesheets=False, keep_link_tags=False,
                                 keep_at_rules=True)


class Templates:
    """The email templates of one directory (and the shipped defaults), ready to render."""

    def __init__(self, directory: Path | None = None, event_types: Iterable[str] = ()) -> None:

        own = directory if directory is not None and directory.resolve() != SHIPPED_DIR.resolve() else None
        self.directory = own
        self.event_types = tuple(event_types) or tuple(sorted(DEFAULT_SUBJECTS))
        self.loader = TemplateLoader(own, SHIPPED_DIR, self.event_types)
        self.env = SandboxedEnvironment(
            loader=self.loader,
            undefined=_StrictUndefined,
            autoescape=select_autoescape(enabled_extensions=("html", "htm", "xml"),
                                         default_for_string=False, default=False),
            auto_reload=True,
            cache_size=1000,
        )
        self._inliner = _inliner()
        #: The shared names (layouts) the shipped templates use: an operator's file of the
        #: same name changes them.
        self._shipped_shared = shipped_shared_names(self.event_types)

    @classmethod
    def from_settings(cls, templates_dir: str | None) -> Templates:
        """The templates of ``EVENTFLOW_TEMPLATES_DIR`` (the shipped ones when unset)."""
        return cls(Path(templates_dir) if templates_dir else None)

    # -- the callers' ways in ------------------------------------------------------------

    def check_event(self, event: Mapping[str, Any]) -> None:
        """Raise :class:`TemplateFailed` unless the event's template renders with its data
        (at the door: CSS is not inlined, only the rendering is checked)."""
        if self.renders_surely(event):
            return
        self.render_event("00000000-0000-0000-0000-000000000000", event, inline_css=False)

    def renders_surely(self, event: Mapping[str, Any]) -> bool:
        """``True`` when the event is known to render without rendering it: its event
        type uses the shipped templates, unchanged, and it carries ``payload.message``,
        the one thing they need (the schema bounds the rest).

        Rendering at the door cost more than the rest of accepting a plain event (batch
        ingest halved, ``bench/templates.py``); the worker still renders every event, and
        ``tests/test_templates.py`` checks this answer against a full render.
        """
        if "message" not in event["payload"]:
            return False
        own = self.directory
        if own is None:
            return True
        if self._shipped_shared is None:
            return False
        return not (own / event["event_type"]).exists() and not any(
            (own / name).exists() for name in self._shipped_shared)

    def render_event(self, event_id: str, event: Mapping[str, Any], *,
                     inline_css: bool = True) -> Rendered:
        """The email of an accepted event (as :func:`original_event` gives it)."""
        payload = event["payload"]
        return self.render(
            event["event_type"], payload.get("data") or {}, payload,
            event_id=event_id, user_id=event.get("user_id", ""),
            locale=payload.get("locale"), inline_css=inline_css,
        )

    def render(
        self, event_type: str, data: Mapping[str, Any], payload: Mapping[str, Any], *,
        event_id: str = "preview", user_id: str = "preview", locale: str | None = None,
        inline_css: bool = True,
    ) -> Rendered:
        """Render ``event_type``'s template; :class:`TemplateFailed` says why it cannot."""
        chain = locale_chain(locale)
        context = {**data, "event": {"id": event_id, "user_id": user_id,
                                     "event_type": event_type, "locale": locale},
                   "payload": payload}
        names: list[str] = []
        outputs: list[str | None] = []
        for part in PARTS:
            candidates = [f"{event_type}/{tag}/{part}" for tag in chain]
            candidates.append(f"{event_type}/{part}")
            try:
                template = self.env.select_template(candidates)
            except TemplatesNotFound:
                if part == "body.html":
                    outputs.append(None)
                    continue
                raise TemplateFailed(f"the template {event_type} has no {part}") from None
            except TemplateError as exc:
                raise _failure(exc, context, candidates[0], self.directory) from None
            names.append(template.name or part)
            try:
                outputs.append(template.render(context))
            except (TemplateError, MissingVariable) as exc:
                raise _failure(exc, context, template.name or part, self.directory) from None
            except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError,
                    MemoryError) as exc:
                # What a template's own expression can raise ({{ 1 / 0 }}, a bad format).
                where = _template_line(exc.__traceback__, (self.directory,)) or template.name
                raise TemplateFailed(f"{where}: {type(exc).__name__}: {exc}") from None
        subject, text, html = outputs
        assert subject is not None and text is not None
        # Line ends around it go (a file ends with one); anything else the producer or the
        # template wrote stays, as a producer's payload.subject always did.
        subject = subject.strip("\r\n")
        _check_subject(subject, names[0])
        size = len(subject.encode()) + len(text.encode()) + len((html or "").encode())
        if size > MAX_RENDERED_BYTES:
            raise TemplateFailed(f"the rendered message is {size} bytes, over the limit of "
                                 f"{MAX_RENDERED_BYTES} bytes ({MAX_RENDERED_BYTES // 1024} KiB)")
        if html is not None and inline_css:
            try:
                html = self._inliner.inline(html)
            except ValueError as exc:
                raise TemplateFailed(f"CSS could not be inlined: {exc}") from None
        used = _used_locale(names, chain)
        return Rendered(subject, text, html, event_type, used, self.loader.version(names))

    # -- for `flask templates check` -----------------------------------------------------

    def locales(self, event_type: str) -> list[str]:
        """The locale directories of ``event_type``'s template."""
        root = self.loader.roots(event_type)[0] / event_type
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir())

    def sample(self, event_type: str, locale: str | None = None) -> dict[str, Any]:
        """The template's own sample (``sample.json``, the locale's first), or a default."""
        candidates = [f"{event_type}/{locale}/{SAMPLE_FILE}"] if locale else []
        candidates.append(f"{event_type}/{SAMPLE_FILE}")
        for name in candidates:
            for root in self.loader.roots(name):
                path = root / name
                if path.is_file():
                    loaded = json.loads(path.read_text("utf-8"))
                    if not isinstance(loaded, dict):
                        raise ValueError(f"{path}: expected a JSON object")
                    return loaded
        return {"payload": {"to_email": "someone@example.com",
                            "message": "This is a sample message."}}

    def compile_errors(self) -> list[str]:
        """Every template of the operator's directory that does not compile (a syntax
        error), as ``name, line N: reason``: logged at start-up, so that a broken file is
        seen before the events that need it are refused."""
        errors: list[str] = []
        if self.directory is None:
            return errors
        for name in self.loader.list_templates():
            if not name.endswith((".txt", ".html", ".htm", ".xml")) or not (
                    self.directory / name).is_file():
                continue
            try:
                self.env.get_template(name)
            except TemplateSyntaxError as exc:
                errors.append(f"{name}, line {exc.lineno}: {exc.message}")
            except (TemplateError, UnicodeDecodeError) as exc:
                errors.append(f"{name}: {exc}")
        errors.extend(f"{name}/: not an event type, so never used"
                      for name in self.unknown_directories())
        return errors

    def unknown_directories(self) -> list[str]:
        """Directories of the operator's that look like event types but name none."""
        if self.directory is None or not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir()
                      if p.is_dir() and re.fullmatch(r"[A-Z][A-Z0-9_]*", p.name)
                      and p.name not in self.event_types)


def shipped_shared_names(event_types: Iterable[str]) -> tuple[str, ...] | None:
    """Every layout or partial the shipped templates extend, include or import (``None``
    if one is named by an expression, so not known before rendering)."""
    env = Environment()
    found: set[str | None] = set()
    for path in SHIPPED_DIR.rglob("*"):
        if path.is_file() and path.suffix in (".txt", ".html"):
            found.update(meta.find_referenced_templates(env.parse(path.read_text("utf-8"))))
    if None in found:
        return None
    return tuple(sorted(name for name in found if name is not None
                        if name.split("/", 1)[0] not in set(event_types)))


def _check_subject(subject: str, name: str) -> None:

    if not subject:
        raise TemplateFailed(f"{name}: the rendered subject is empty")
    if len(subject) > MAX_SUBJECT_CHARS:
        raise TemplateFailed(f"{name}: the rendered subject is longer than "
                             f"{MAX_SUBJECT_CHARS} characters")
    try:
        reject_header_breaks(subject)
    except ValidationError as exc:
        reason = " ".join(map(str, exc.messages)) if isinstance(exc.messages, list) \
            else str(exc.messages)
        raise TemplateFailed(f"{name}: the rendered subject is refused: {reason}") from None


def _used_locale(names: list[str], chain: list[str]) -> str | None:
    """The most specific locale whose file was used."""
    for tag in chain:
        if any(f"/{tag}/" in name for name in names):
            return tag
    return None


def _template_line(tb: TracebackType | None, roots: Iterable[Path | None] = ()
                   ) -> str | None:
    """``PASSWORD_RESET/body.txt, line 3``: where in a template an error was raised (the
    innermost template frame, named relative to the directory it came from)."""
    found = None
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename.endswith((".txt", ".html", ".htm", ".xml")):
            found = (code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    if found is None:
        return None
    filename, line = found
    for root in (*roots, SHIPPED_DIR):
        if root is not None and filename.startswith(str(root) + os.sep):
            return f"{Path(filename).relative_to(root).as_posix()}, line {line}"
    return f"{Path(filename).name}, line {line}"


def _path_to(target: Any, context: Mapping[str, Any]) -> str | None:
    """Where ``target`` sits in the template's variables (by identity): ``user.address``."""
    todo: list[tuple[str, Any]] = list(context.items())
    visited = 0
    while todo and visited < 10_000:
        path, value = todo.pop()
        visited += 1
        if value is target:
            return path
        if isinstance(value, dict):
            todo.extend((f"{path}.{key}", item) for key, item in value.items())
        elif isinstance(value, list):
            todo.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def _failure(exc: Exception, context: Mapping[str, Any], name: str,
             directory: Path | None = None) -> TemplateFailed:
    """The :class:`TemplateFailed` for a Jinja error, naming the missing variable."""
    where = _template_line(exc.__traceback__, (directory,)) or name
    if isinstance(exc, MissingVariable):
        owner = None if exc.owner is missing else _path_to(exc.owner, context)
        step = f"[{exc.name}]" if isinstance(exc.name, int) else f".{exc.name}"
        variable = str(exc.name) if exc.owner is missing or not owner else f"{owner}{step}"
        if owner == "payload" and exc.name in ("message", "subject", "to_email"):
            return TemplateFailed(f"Missing data for required field (the template uses "
                                  f"payload.{exc.name}: {where}).", field=str(exc.name))
        return TemplateFailed(f"Missing variable '{variable}' ({where}).")
    if isinstance(exc, TemplateNotFound):  # (TemplatesNotFound is one too)
        return TemplateFailed(f"{where}: template not found: {exc.name}")
    if isinstance(exc, TemplateSyntaxError) and exc.name:
        return TemplateFailed(f"{exc.name}, line {exc.lineno}: {exc.message}")
    return TemplateFailed(f"{where}: {type(exc).__name__}: {exc}")
