"""The OpenFeature provider: flag keys are setting names, evaluation contexts are context features."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import msgspec
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import (
    FlagNotFoundError,
    GeneralError,
    OpenFeatureError,
    ProviderNotReadyError,
    TypeMismatchError,
)
from openfeature.flag_evaluation import FlagResolutionDetails, Reason
from openfeature.provider import AbstractProvider, Metadata

from heksher_shm._process import main as _main
from heksher_shm.exceptions import SegmentError
from heksher_shm.openfeature.events import Events
from heksher_shm.openfeature.flags import (
    Flag,
    Moved,
    SnapshotView,
    features_of,
    foreign_flag,
    own_flag,
    read_view,
    resolve_foreign,
    resolve_own,
)
from heksher_shm.openfeature.kinds import Kind
from heksher_shm.setting import FEATURE_NAME, Setting

if TYPE_CHECKING:
    from openfeature.flag_evaluation import FlagValueType  # not in every SDK version this supports

__all__ = ["HeksherProvider"]

_READ_ROUNDS = 20
_current_main = _main.current
_monotonic = time.monotonic


class HeksherProvider(AbstractProvider):
    """An OpenFeature provider that resolves flags from Heksher settings, through a heksher_shm client.

    Args:
        client: the client to resolve through (a :class:`~heksher_shm.ThreadHeksherClient`,
            :class:`~heksher_shm.AsyncHeksherClient` or a stub client). ``None`` (the default): the
            process's main client, whichever it is at each evaluation (a follower or the leader).
        targeting_key: the context feature that an evaluation context's targeting key fills.

    Raises:
        ValueError: *targeting_key* is not a context feature name.
        TypeError: *client* is not a heksher_shm client.

    A flag key is a setting's name. The provider serves every setting the client's
    snapshot holds: the settings of this process (answered exactly as their
    ``get()`` answers, with their own types and validators) and, through the
    host's shared segment, those that only other processes declared (converted
    with the type their declaration gave; see the OpenFeature page of the
    documentation).

    The evaluation context's attributes are context features, and must all be
    context features of the service with string values; the targeting key fills
    the feature named by *targeting_key*. Features the setting is not
    configurable by are ignored; the client's defaults (``set_defaults``) fill
    in the ones left out.

    Resolution details: the value, and the reason ``TARGETING_MATCH`` (a rule
    matched: its id is the flag metadata's ``rule_id``, its metadata the keys
    ``rule_metadata.<key>``, the variant ``rule-<id>``), ``DEFAULT`` (no rule
    matched; variant ``default``) or ``STALE`` (the rules are older than the
    staleness bound, :func:`heksher_shm.status.stale_after`). Errors:
    ``FLAG_NOT_FOUND`` (no such setting in the snapshot), ``TYPE_MISMATCH`` (the
    setting's type is not the resolver's), ``INVALID_CONTEXT`` (see above),
    ``TARGETING_KEY_MISSING`` (the targeting key's feature is needed and
    missing), ``PROVIDER_NOT_READY`` (no main client yet).

    Events (``PROVIDER_READY``, ``PROVIDER_ERROR``, ``PROVIDER_STALE``,
    ``PROVIDER_CONFIGURATION_CHANGED`` with the changed settings' names) come from
    the client's own wake-ups, in every process: see :mod:`heksher_shm.openfeature.events`.
    """

    def __init__(self, client: Any = None, *, targeting_key: str = "user") -> None:
        super().__init__()
        if not isinstance(targeting_key, str) or not FEATURE_NAME.fullmatch(targeting_key):
            raise ValueError(
                f"targeting_key must be a context feature name ([a-zA-Z_0-9]+), got {targeting_key!r}"
            )
        if client is not None and not hasattr(client, "_context_view"):
            raise TypeError(f"client must be a heksher_shm client, got {client!r}")
        self.client = client
        """The client given (``None``: the process's main client at each evaluation)."""
        self.targeting_key = targeting_key
        """The context feature the targeting key fills."""
        self._lock = threading.RLock()
        self._flags: dict[str, Flag] = {}
        self._absent: dict[str, tuple[Any, int, str]] = {}
        """Keys no setting has: (source, generation) where that was found, and the error message."""
        self._flags_client: Any = None
        self._view: SnapshotView | None = None
        self._stale_at = math.inf
        """When (``time.monotonic()``) the rules turn stale; kept by the events at each wake-up."""
        self._events = Events(self)

    # -- the provider's life -----------------------------------------------------------------------------

    def get_metadata(self) -> Metadata:
        """``Metadata(name="heksher_shm")``."""
        return Metadata(name="heksher_shm")

    def initialize(self, evaluation_context: EvaluationContext) -> None:
        """Start listening to the client's updates (the SDK calls it from ``set_provider``).

        Rules that are already stale (the service is down as the application starts, and a snapshot
        serves) do not fail it: the SDK reports the provider ready, every resolution says ``STALE``,
        and the first wake-up of the client emits ``PROVIDER_STALE``.

        Raises:
            ProviderNotReadyError: no client yet (no main client in this process): the SDK reports the
                provider in error; the first successful update after one becomes main makes it ready.
        """
        client = self._current()
        if client is None:
            self._events.state = "error"
            raise ProviderNotReadyError(
                "no main Heksher client in this process yet: call set_as_main() first"
            )
        self._bind(client)

    def shutdown(self) -> None:
        """Stop listening to the client and forget every kept answer."""
        with self._lock:
            self._events.unbind()
            self._flags, self._absent, self._flags_client, self._view = {}, {}, None, None

    # -- the typed resolvers (the SDK's *_async resolvers call these: nothing here waits) -------------

    def resolve_boolean_details(
        self, flag_key: str, default_value: bool, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[bool]:
        """Resolve a ``bool`` setting (or an enum of booleans)."""
        return self._resolve(Kind.BOOLEAN, flag_key, default_value, evaluation_context)

    def resolve_string_details(
        self, flag_key: str, default_value: str, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[str]:
        """Resolve a ``str`` setting (or an enum of strings: the member's value)."""
        return self._resolve(Kind.STRING, flag_key, default_value, evaluation_context)

    def resolve_integer_details(
        self, flag_key: str, default_value: int, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[int]:
        """Resolve an ``int`` setting (or an enum of integers)."""
        return self._resolve(Kind.INTEGER, flag_key, default_value, evaluation_context)

    def resolve_float_details(
        self, flag_key: str, default_value: float, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[float]:
        """Resolve a ``float`` setting (or an enum of numbers), as a float."""
        return self._resolve(Kind.FLOAT, flag_key, default_value, evaluation_context)

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: Sequence[FlagValueType] | Mapping[str, FlagValueType],
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Sequence[FlagValueType] | Mapping[str, FlagValueType]]:
        """Resolve a sequence (a list), mapping (an object) or flags setting (the list of the set flags'
        names). Each call gets a value of its own, free to change."""
        found = self._resolve(Kind.OBJECT, flag_key, default_value, evaluation_context)
        if found.error_code is not None:
            return found
        return dataclasses.replace(found, value=_copy(found.value))

    # -- resolution -------------------------------------------------------------------------------------

    def _resolve(
        self, kind: Kind, key: str, default: Any, context: EvaluationContext | None
    ) -> FlagResolutionDetails[Any]:
        # The fast path: an answer kept for this context, still valid. What it checks is what makes an
        # answer out of date (see heksher_shm.openfeature.flags); anything else goes the slow way.
        flag = self._flags.get(key)
        if flag is not None and flag.kind is kind:
            setting = flag.setting
            if setting is not None:
                # A setting's state is replaced whenever its answers may change, a new main client too.
                state = setting._state
                fresh = state is flag.state and state.published[0] == state.generation
            else:
                client = self.client
                if client is None:
                    client = _current_main()
                fresh = (
                    flag.client is client
                    and flag.words[2] == flag.generation
                    and client._defaults_version == flag.defaults
                    and client._snapshot_source() is flag.source
                )
            if fresh:
                if context is None:
                    cache_key: Any = None
                else:
                    attributes = context.attributes
                    cache_key = (context.targeting_key, tuple(attributes.items()) if attributes else ())
                if flag.contextvars:
                    cache_key = (cache_key, tuple(variable.get(None) for variable in flag.contextvars))
                try:
                    found = flag.cache.get(cache_key)
                except TypeError:  # an attribute that cannot be a key (a list): the slow path says why
                    found = None
                if found is not None and _monotonic() < self._stale_at:
                    return found
        return self._slow(kind, key, default, context)

    def _slow(
        self, kind: Kind, key: str, default: Any, context: EvaluationContext | None
    ) -> FlagResolutionDetails[Any]:
        try:
            found = self._answer(kind, key, context)
        except OpenFeatureError as e:
            return FlagResolutionDetails(
                default, error_code=e.error_code, error_message=e.error_message, reason=Reason.ERROR
            )
        if _monotonic() >= self._stale_at:
            return dataclasses.replace(found, reason=Reason.STALE)
        return found

    def _answer(self, kind: Kind, key: str, context: EvaluationContext | None) -> FlagResolutionDetails[Any]:
        client = self._current()
        if client is None:
            raise ProviderNotReadyError(
                "no main Heksher client in this process yet: call set_as_main() first"
            )
        if client is not self._flags_client:
            self._bind(client)
        features = features_of(context, self.targeting_key, getattr(client, "_context_features", ()))
        for _ in range(_READ_ROUNDS):
            try:
                flag = self._flag(client, key)
                if flag.kind is not kind:
                    raise TypeMismatchError(
                        f"setting {key!r} is of type {flag.type.string}, which OpenFeature reads as "
                        f"{flag.kind.value}, not {kind.value}"
                    )
                if flag.setting is not None:
                    source = self._source(client)
                    view = self._view_now(source)
                    found, state = resolve_own(flag, features, self.targeting_key, view, source)
                    if (
                        state is not flag.state
                    ):  # the setting changed meanwhile: keep answers for its new state
                        flag = self._flags[key] = own_flag(flag.setting, client)
                        flag.state = state
                    if state.published[0] != state.generation:
                        return found  # a newer snapshot waits already: nothing to keep
                else:
                    found = resolve_foreign(flag, features, self.targeting_key)
            except Moved:
                continue
            flag.remember(_key(flag, context), found)
            return found
        raise ProviderNotReadyError("the host's snapshot kept changing while being read; try again")

    def _flag(self, client: Any, key: str) -> Flag:
        """The flag of setting *key*: kept if still valid, else made from the setting or the snapshot."""
        flag = self._flags.get(key)
        source = self._source(client)
        if flag is not None and flag.setting is not None:
            if flag.setting._state.feed is None or client._feeds(flag.setting):
                return flag
        elif (
            flag is not None
            and source is flag.source
            and flag.words[2] == flag.generation
            and client._defaults_version == flag.defaults
        ):
            return flag
        absent = self._absent.get(key)
        if absent is not None and absent[0] is source and absent[1] == source.generation():
            raise FlagNotFoundError(absent[2])  # looked for in this snapshot already: not in it
        view = self._view_now(source)
        setting = _own_setting(client, key)
        if setting is not None:
            flag = own_flag(setting, client)
        elif source is None or view is None:
            raise FlagNotFoundError(f"no setting {key!r} in this process, and no shared snapshot to look in")
        else:
            try:
                flag = foreign_flag(view, source, client, key)
            except FlagNotFoundError as e:
                # A setting declared from now on comes with a new snapshot: look again then.
                self._absent[key] = (source, view.generation, e.error_message or "")
                raise
        self._absent.pop(key, None)
        self._flags[key] = flag
        return flag

    def _view_now(self, source: Any) -> SnapshotView | None:
        """The snapshot as it is now (read again when a new one was published)."""
        if source is None:
            return None
        view = self._view
        if view is None or view.generation != source.generation():
            try:
                view = self._view = read_view(source)
            except (SegmentError, ValueError) as e:
                raise GeneralError(f"the host's snapshot cannot be read: {e}") from None
        return view

    def _bind(self, client: Any) -> None:
        with self._lock:
            if client is not self._flags_client:
                self._flags, self._absent, self._view, self._flags_client = {}, {}, None, client
            self._events.bind(client)

    def _current(self) -> Any:
        return self.client if self.client is not None else _current_main()

    @staticmethod
    def _source(client: Any) -> Any:
        """What *client* reads snapshots from (None for a stub client)."""
        get = getattr(client, "_snapshot_source", None)
        return None if get is None else get()


def _key(flag: Flag, context: EvaluationContext | None) -> Any:
    """The key of *context*'s answer in *flag*'s cache (as the fast path of ``_resolve`` spells it)."""
    key: Any = None
    if context is not None:
        attributes = context.attributes
        key = (context.targeting_key, tuple(attributes.items()) if attributes else ())
    if flag.contextvars:
        key = (key, tuple(variable.get(None) for variable in flag.contextvars))
    return key


def _own_setting(client: Any, name: str) -> Setting[Any] | None:
    """The setting called *name* that *client* feeds in this process (the newest, if several); one
    no client feeds (a stub client's setting without stub rules) answers its default."""
    found = None
    for live in _main.live_settings():
        setting = cast("Setting[Any]", live)
        if setting.name == name and (setting._state.feed is None or client._feeds(setting)):
            found = setting
    return found


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def _copy(value: Any) -> Any:
    return _decoder.decode(_encoder.encode(value))
