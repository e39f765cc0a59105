"""An OpenFeature provider for heksher_shm: :class:`HeksherProvider` (extra ``heksher_shm[openfeature]``).

.. code-block:: python

    from openfeature import api
    from heksher_shm.openfeature import HeksherProvider

    api.set_provider(HeksherProvider())  # resolves through the process's main client
    api.get_client().get_integer_value("cache_size", 10, EvaluationContext("alice"))

The modules, each importing only those below it: ``provider`` (the provider:
resolution, reasons, errors) -> ``events`` (its events, from the client's
update listeners) -> ``flags`` (one flag's answers, and the snapshot they
are read from) -> ``kinds`` (settings' types as OpenFeature types).
"""

try:
    import openfeature as _openfeature  # noqa: F401
except ImportError as _error:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "heksher_shm.openfeature needs the OpenFeature SDK: pip install 'heksher_shm[openfeature]' "
        "(or openfeature-sdk)"
    ) from _error

from heksher_shm.openfeature.provider import HeksherProvider

__all__ = ["HeksherProvider"]
