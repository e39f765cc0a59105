"""Settings: what an application declares, and the hot path that answers ``get()``.

A :class:`Setting` registers itself with the process's main client on
creation (or waits for one). The process holds a setting strongly until it
has been declared and weakly after that (see :mod:`heksher_shm._process.main`): a
declared setting that is garbage collected is no longer updated.

``get()`` is the hot path. Each update compiles a setting's rules once
(:mod:`heksher_shm._model.resolve`) into a :class:`_State`; ``get()`` checks
one generation word, then calls the state's lookup
(:mod:`heksher_shm._model.lookup`), which answers from a small per-state
cache, or resolves the context and remembers the answer.

A setting is fed its rules by one *feed* (the main client's
:class:`~heksher_shm.clients._feed.SettingsFeed`, or a stub client), and the
two meet through one narrow interface, :class:`_Feed`: a state is built
with the feed's context view and watches the feed's published generation
word; when that word moves past the state's generation, ``get()`` asks the
feed to refresh the setting. The feed, in turn, changes a setting only
through the methods under "what a feed does to a setting" below.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from heksher_shm._model.lookup import compile_lookup
from heksher_shm._model.protocol import DeclarationBody, declaration_digest
from heksher_shm._model.resolve import CompiledRules
from heksher_shm._process import main as _main
from heksher_shm.setting_types import Conversion, SettingType, setting_type

__all__ = ["QueriedRule", "Setting"]

logger = logging.getLogger("heksher_shm.setting")

T = TypeVar("T")

SETTING_NAME = re.compile(r"[a-zA-Z_0-9.]+")
FEATURE_NAME = re.compile(r"[a-zA-Z_0-9]+")
VERSION = re.compile(r"([0-9]+)\.([0-9]+)")

_UNFED = 0
"""The generation of a setting no feed serves: its states watch a constant word of that value."""
_NEVER_PUBLISHED: Sequence[int] = (_UNFED,)

_CACHE_LIMIT = 4096
"""Answers remembered per setting between updates (one per distinct context, or per class of contexts
once the lookup has turned coarse: see heksher_shm._model.lookup); the cache is cleared when full."""


@dataclass(frozen=True)
class QueriedRule:
    """The rule a value came from, as passed to validators and ``on_coerce``.

    Attributes:
        rule_id: the service's id of the rule (``None`` for stub rules).
        context_features: the rule's exact-match conditions, as ``[feature, value]``
            lists in the service's order of features (what heksher 0.2.2 hands over:
            the service's JSON, decoded).
    """

    rule_id: int | None
    context_features: Sequence[Sequence[str]]


Validator = Callable[[T, "QueriedRule | None", "Setting[T]"], T]
OnCoerce = Callable[[T, Any, Sequence[str], "QueriedRule | None", "Setting[T]"], T]


def _keep_coerced(value: T, *_: Any) -> T:
    return value


def _reject_coerced(
    value: Any, raw: Any, coercions: Sequence[str], rule: QueriedRule | None, setting: Setting[Any]
) -> Any:
    raise TypeError(f"coercion is disabled for setting {setting.name}, coercions: {list(coercions)}")


@dataclass(frozen=True)
class _ContextView:
    """What a client contributes to resolving a context: defaults, and tracked values to warn about."""

    const: Mapping[str, str]
    variables: tuple[tuple[str, ContextVar[str]], ...]
    tracked: Mapping[str, str | set[str]] | None
    """Tracked values per feature (``TRACK_ALL`` or a set); None: no warnings about untracked values."""
    warn: Callable[[str, str], None]

    def default(self, feature: str) -> str | None:
        """The client's default for *feature*: a constant, else its context variable's value; None when
        there is none (no default, or a variable with no value)."""
        if feature in self.const:
            return self.const[feature]
        for name, variable in self.variables:
            if name == feature:
                try:
                    return variable.get()
                except LookupError:
                    return None
        return None


class _Feed(Protocol):
    """What feeds a setting its rules: the one interface from a :class:`Setting` to what serves it.

    A state is built with :meth:`context_view` and watches :attr:`published`;
    ``get()`` calls :meth:`refresh` when the published generation is not the
    state's own.
    """

    @property
    def published(self) -> Sequence[int]:
        """A live one-item view: item 0 is the generation last published where this feed's rules come
        from (read by every ``get()``: one aligned load, no call)."""
        ...

    def context_view(self) -> _ContextView:
        """The defaults and tracked values a new state resolves contexts with."""
        ...

    def refresh(self, setting: Setting[Any]) -> None:
        """A snapshot newer than *setting*'s state was published: bring the setting up to date now if
        that takes no waiting (else its current rules answer until the feed applies it)."""
        ...


class _State:
    """Everything ``get()`` reads, replaced whole when the rules change.

    ``miss`` is the setting's lookup (:mod:`heksher_shm._model.lookup`): it
    answers every ``get()``, from ``cache`` (which it fills) or by resolving.
    Besides the cache, only ``generation`` changes in place: the feed moves it
    on when a snapshot leaves these rules as they are (or sets it to ``None``
    to have the next ``get()`` refresh the setting).
    """

    __slots__ = (
        "cache",
        "contextvars",
        "digest",
        "feed",
        "generation",
        "miss",
        "pending",
        "published",
        "rules",
    )

    def __init__(
        self,
        setting: Setting[Any],
        feed: _Feed | None,
        rules: CompiledRules | None,
        server_default: Any,
        digest: bytes | None = None,
        generation: int | None = None,
    ) -> None:
        self.feed = feed
        self.rules = rules
        self.digest = digest
        """The digest of the snapshot blob the rules came from (None: not from a snapshot, or to be
        rebuilt from the next one): the feed skips a setting whose blob it already holds."""
        # get() is stale when published[0] (the feed's published generation) is not the generation
        # this state is current for; None is current for none (the next get() refreshes).
        self.published = feed.published if feed is not None else _NEVER_PUBLISHED
        self.generation: int | None = generation if feed is not None else _UNFED
        view = feed.context_view() if feed is not None else None
        features = frozenset(setting.configurable_features)
        variables = {f: v for f, v in view.variables if f in features} if view is not None else {}
        self.contextvars = tuple(variables.values())
        self.cache: dict[Any, Any] = {}
        self.miss = compile_lookup(
            setting.name,
            features,
            view.const if view is not None else {},
            variables,
            view.tracked if view is not None else None,
            view.warn if view is not None else None,
            rules,
            server_default if server_default is not None else setting.default_value,
            self.cache,
            _CACHE_LIMIT,
        )
        self.pending: Callable[[], None] | None = None
        """Set on a state whose rules arrived but are not compiled yet (see ``Setting._defer``)."""

    def derived(
        self,
        generation: int | None,
        digest: bytes | None,
        rules: CompiledRules | None,
        cache: dict[Any, Any],
        miss: Callable[[dict[str, str]], Any],
        pending: Callable[[], None] | None,
    ) -> _State:
        """A state of the same feed and defaults, built without asking the feed anything or compiling a
        lookup (a snapshot may defer a thousand). It watches the feed's published word as it is now
        (the feed may have moved to a new segment file since this one was made)."""
        state = _State.__new__(_State)
        state.feed, state.contextvars = self.feed, self.contextvars
        state.published = self.feed.published if self.feed is not None else self.published
        state.generation = generation
        state.digest, state.rules, state.cache = digest, rules, cache
        state.miss, state.pending = miss, pending
        return state


_order = itertools.count()


class Setting(Generic[T]):
    """A setting whose value depends on context.

    Args:
        name: the setting's name (``[a-zA-Z_0-9.]+``).
        type: its type: a :class:`~heksher_shm.SettingType`, ``int``, ``float``,
            ``str``, ``bool``, an :class:`enum.Enum` or :class:`enum.IntFlag`
            subclass, ``Sequence[T]`` or ``Mapping[str, T]``.
        configurable_features: the context features it can be configured by.
        default_value: the value when no rule matches and the service sent no
            usable default.
        metadata: declared with the setting.
        alias: the setting's former name (the service renames it).
        version: ``"major.minor"``.
        on_coerce: ``on_coerce(coerced, raw, coercions, rule_or_None, setting)``
            is called when a server value had to be coerced to the local type;
            it returns the value to use or raises :class:`TypeError` to reject
            it (any other exception: as for a validator, see
            :meth:`add_validator`). ``None`` rejects every coercion. The
            default keeps the coerced value.

    Raises:
        ValueError: a malformed name, feature, version or feature list.
        TypeError: an unusable *type*.

    Creating a setting registers it with the main client, or holds it until a
    client becomes main; it is then declared. It is held strongly until it
    has been declared, so it need not be kept for that; weakly after that.
    """

    def __init__(
        self,
        name: str,
        type: Any,
        configurable_features: Sequence[str],
        default_value: T,
        metadata: Mapping[str, Any] | None = None,
        alias: str | None = None,
        version: str = "1.0",
        on_coerce: OnCoerce[T] | None = _keep_coerced,
    ) -> None:
        if not isinstance(name, str) or not SETTING_NAME.fullmatch(name):
            raise ValueError(f"setting name must match [a-zA-Z_0-9.]+, got {name!r}")
        if isinstance(configurable_features, str):
            raise ValueError(f"configurable_features of {name} must be a sequence of names, not a string")
        features = tuple(configurable_features)
        for feature in features:
            if not isinstance(feature, str) or not FEATURE_NAME.fullmatch(feature):
                raise ValueError(f"context feature names must match [a-zA-Z_0-9]+, got {feature!r} in {name}")
        if len(set(features)) != len(features):
            raise ValueError(f"configurable_features of {name} repeat a feature: {list(features)}")
        version_match = VERSION.fullmatch(version) if isinstance(version, str) else None
        if version_match is None:
            raise ValueError(f'version of {name} must be "major.minor", got {version!r}')
        if alias is not None and not (isinstance(alias, str) and SETTING_NAME.fullmatch(alias)):
            raise ValueError(f"alias of {name} must match [a-zA-Z_0-9.]+, got {alias!r}")

        self.name = name
        self.type: SettingType[T] = setting_type(type)
        self.configurable_features = features
        self.default_value = default_value
        self.metadata: Mapping[str, Any] = dict(metadata or {})
        self.alias = alias
        self.version_str = version
        self.version = (int(version_match[1]), int(version_match[2]))
        self.on_coerce: OnCoerce[T] = _reject_coerced if on_coerce is None else on_coerce
        self.server_default_value: T | None = None
        self._validators: list[Validator[T]] = []
        self._order = next(_order)
        self._state = _State(self, None, None, None)
        # Encoding the default here surfaces a default the type cannot express
        # at once, rather than inside a background declaration.
        self._declaration = DeclarationBody(
            name=name,
            configurable_features=list(features),
            type=self.type.heksher_string(),
            default_value=self.type.convert_to_heksher(default_value),
            metadata=dict(self.metadata),
            version=version,
            alias=alias,
        )
        try:
            self._digest = declaration_digest(self._declaration)
            # Encoded once: every registration of the process carries it.
            self._declaration_json = msgspec.Raw(msgspec.json.encode(self._declaration))
        except (TypeError, msgspec.EncodeError) as e:
            raise TypeError(f"default value of {name} cannot be sent to the service: {e}") from None
        _main.register(self)

    def __repr__(self) -> str:
        return f"<Setting {self.name} {self.type.heksher_string()} v{self.version_str}>"

    # -- public API ------------------------------------------------------------------------------------------

    def add_validator(self, validator: Validator[T]) -> Validator[T]:
        """Add ``validator(value, rule_or_None, setting) -> value``, run on every server value.

        Validators run in the order added, on each rule value and on the
        server default at every update; raising :class:`TypeError` rejects
        that value. Any other exception keeps the setting's previous rules
        and server default until the next update, and goes to the log and to
        the client's ``on_update_error``, never out of ``get()``. Local
        defaults are not validated. Returns *validator*, so this works as a
        decorator.
        """
        self._validators.append(validator)
        return validator

    def get(self, **contexts: str) -> T:
        """The value for a context: the best matching rule, else the server default, else ``default_value``.

        Args:
            **contexts: values of context features; features left out are taken
                from the client's defaults (``set_defaults``).

        Raises:
            ValueError: a keyword that is not a configurable feature of this setting.
            RuntimeError: a configurable feature has neither a value nor a
                default (once rules for the setting were received).
        """
        state = self._state
        # The one shared-memory read of the no-change path: has a newer snapshot been published?
        if state.published[0] != state.generation:
            feed = state.feed
            if feed is not None:
                feed.refresh(self)
                state = self._state
        # The lookup keeps its own cache (state.cache): see heksher_shm._model.lookup. Loaded into a
        # local first: a call straight on the slot (state.miss(...)) is not specialised by CPython 3.11.
        lookup = state.miss
        return lookup(contexts)  # type: ignore[no-any-return]

    # -- what a feed does to a setting (see _Feed) -----------------------------------------------------------
    # A feed calls these with its own lock held: it is the only writer of the state of the settings it
    # serves (a stub client sets states whole, through _set_state).

    def _explain(self, contexts: Mapping[str, str]) -> tuple[T, tuple[tuple[str, str], ...] | None, object]:
        """What ``get(**contexts)`` answers, the conditions of the rule it answers from (``None``: no
        rule matched, the default answers), and the state both come from. Raises as ``get()`` does.

        The answer holds while ``self._state`` is that state and no newer snapshot waits for it
        (``state.published[0] == state.generation``, the check ``get()`` makes). For
        :mod:`heksher_shm.openfeature`, which names the matching rule and keeps answers by that test:
        keep this method and that test through refactors of the state. Not for the hot path.
        """
        self.get(**contexts)  # applies a snapshot that is waiting, and raises what get() raises
        state = self._state
        if state.pending is not None:  # newer rules arrived meanwhile: install them, then read them
            state.pending()
            state = self._state
        value = state.miss(dict(contexts))
        rules = state.rules
        if rules is None:
            return value, None, state
        view = state.feed.context_view() if state.feed is not None else None
        namespace = dict(contexts)
        for feature in rules.features:
            if feature in namespace or view is None:
                continue
            default = view.default(feature)  # none: get() raised already if the feature is needed
            if default is not None:
                namespace[feature] = default
        return value, rules.match(namespace), state

    def _convert(self, raw: Any, rule: QueriedRule | None) -> Conversion[T]:
        """Convert a server value: type, then ``on_coerce`` if it coerced, then validators."""
        converted = self.type.convert_from_heksher(raw)
        value = converted.value
        if converted.coercions:
            value = self.on_coerce(value, raw, converted.coercions, rule, self)
        for validator in self._validators:
            value = validator(value, rule, self)
        return Conversion(value, converted.coercions)

    def _install_state(
        self,
        feed: _Feed | None,
        rules: CompiledRules | None,
        digest: bytes | None = None,
        generation: int | None = None,
    ) -> None:
        """Compile and swap in what ``get()`` reads, for *feed*'s defaults and these rules, current for
        snapshot *generation* (None: for none, the next ``get()`` refreshes the setting)."""
        self._state = _State(self, feed, rules, self.server_default_value, digest, generation)

    def _defer(self, feed: _Feed, load: Callable[[], None], digest: bytes, generation: int) -> None:
        """Swap in a state whose first ``get()`` runs *load*, which must install the real state.

        A process that uses one setting of a thousand pays for that one: new
        rules are decoded, converted and compiled on the setting's next
        ``get()``, not when the snapshot arrives. *load* must leave a state
        without ``pending`` in place: the new rules, or the previous ones.
        """
        current = self._state
        if current.feed is feed:
            self._state = current.derived(generation, digest, None, {}, self._load_then_miss, load)
        else:
            state = _State(self, feed, None, self.server_default_value, digest, generation)
            state.miss, state.pending = self._load_then_miss, load
            self._state = state

    def _restore(self, state: _State, digest: bytes | None, generation: int | None) -> None:
        """Go back to *state*'s rules (new ones proved unusable), as built from *digest* (None: to be
        rebuilt from the next snapshot) and current for *generation*."""
        self._state = state.derived(generation, digest, state.rules, state.cache, state.miss, state.pending)

    def _mark_current(self, generation: int | None) -> None:
        """The state in place stays right for snapshot *generation* (None: for none, so that the next
        ``get()`` refreshes the setting)."""
        self._state.generation = generation

    def _load_then_miss(self, contexts: dict[str, str]) -> Any:
        """The lookup of a deferred state: install the rules it waits for, then look up."""
        pending = self._state.pending
        if pending is not None:
            pending()
        return self._state.miss(contexts)

    def _set_state(self, state: _State) -> None:
        """Swap in *state* whole (a stub client restoring the rules it saved)."""
        self._state = state

    def _declaration_body(self) -> DeclarationBody:
        return self._declaration
