"""Publish time and segment size for 1k / 10k / 100k rules over 1,000 settings.

How "publish" is measured: the leader's own update code is driven directly.
A child process (ours only) asks the service once for the query the engine
itself asks for (its ``Call`` effect, every setting and every context
tracked), keeps the response, and then runs the engine's update step on it
again and again with a fresh term, against a real segment file: decoding the
JSON response, encoding one blob per setting, the head, and
``Segment.publish`` (with its checksums and the final generation store). The
HTTP round trip and the service's own time are *not* included: they depend on
the service, not on us. The parts are also timed one by one with the same
functions.

Sizes: the query response's JSON body; the segment file after the repeats
(two slots, as a reader may still hold the previous one: this is the steady
size on disk and in shared memory); and the snapshot itself (one slot's used
length).

For reference, the same child times what heksher 0.2.2 does with the same
response in *every* process at every change: ``response.json()`` and its
``_update_settings_from_query`` over the same 1,000 settings.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

from benchmarks._common import Run, child_main, emit, log, summary
from benchmarks._scenario import BIG_TRACK, grow_big, specs_from
from benchmarks._service import CONTEXT_FEATURES

NAME = "publish"
MODULE = "bench_publish"
TITLE = "Publish time and segment size, 1,000 settings"
TARGET = "publish <= 300 ms at 100k; segment <= 2x the query response's JSON size"


def _engine_update(segment: Any, specs: list[Any]) -> tuple[Any, int]:
    """A function running the engine's update step on a response, publishing into *segment* under the
    term (fencing token) it returns with.

    The step is the engine's own (:class:`heksher_shm._engine.updating.Updater`), driven here in place:
    its CPU work (Digest, Compute) and its writes to the segment are performed as the blocking driver
    performs them, and nothing else is asked of it (the bench stands in for the host).
    """
    import random
    import time as _time

    import httpx

    from heksher_shm._engine import effects as fx
    from heksher_shm._engine.answers import digest_query
    from heksher_shm._engine.context import Context, ErrorBook
    from heksher_shm._engine.declaring import Declarer
    from heksher_shm._engine.term import Term
    from heksher_shm._engine.updating import Updater
    from heksher_shm._model.contexts import context_filters

    class Clock:
        monotonic = staticmethod(_time.monotonic)
        wall = staticmethod(_time.time)

    ctx = Context(
        update_interval=60.0,
        context_features=list(CONTEXT_FEATURES),
        shared=True,
        clock=Clock(),
        rng=random.Random(0),
        errors=ErrorBook(os.getpid()),
    )
    updater = Updater(ctx, Declarer(ctx))
    filters = context_filters({f: v if v == "*" else set(v) for f, v in BIG_TRACK.items()})
    spec = (tuple(sorted(name for name, *_ in specs)), filters)
    term = segment.begin_term()

    def perform(effect: Any) -> Any:
        if isinstance(effect, fx.Digest):
            return digest_query(effect.response, effect.queried)
        if isinstance(effect, fx.Compute):
            return effect.fn()
        if isinstance(effect, fx.KeepsLead):
            return True
        if isinstance(effect, fx.Publish):
            return segment.publish(effect.head, effect.blobs, effect.term)
        if isinstance(effect, fx.RecordOk):
            return segment.record_update_ok(effect.when)
        if isinstance(effect, (fx.Acknowledge, fx.RecordError, fx.KeepSnapshot)):
            return None  # no one waits for an answer here, and no last-known-good file is kept
        raise RuntimeError(f"the update step asked for more than one request: {type(effect).__name__}")

    def update(response: httpx.Response | None) -> tuple[fx.Call, Any]:
        steps = updater.update(Term(term), [], spec)
        call = steps.send(None)
        if response is None:
            steps.close()
            return call, None
        value: Any = response
        while True:
            try:
                effect = steps.send(value)
            except StopIteration as stop:
                if stop.value is not None:
                    raise RuntimeError(f"the update failed: {stop.value!r}") from stop.value
                return call, None
            value = perform(effect)

    return update, term


def _peer_apply(content: bytes, specs: list[Any]) -> float:
    """heksher 0.2.2's work on one changed response, in one process."""
    import heksher
    import httpx

    client = heksher.ThreadHeksherClient("http://127.0.0.1:1", 60, list(CONTEXT_FEATURES))
    types = {"int": int, "str": str}
    settings = [heksher.Setting(name, types[t], features, d) for name, t, features, d in specs]
    for setting in settings:
        client._tracked_settings[setting.name] = setting
    response = httpx.Response(200, content=content, headers={"content-type": "application/json"})
    start = time.perf_counter()
    with client.modification_lock:
        client._update_settings_from_query(response.json()["settings"])
    return time.perf_counter() - start


def body(params: dict[str, Any]) -> None:
    import httpx
    import msgspec

    from heksher_shm._model import protocol as proto
    from heksher_shm._model.snapshot import FORMAT, Head, blob_of, encode_head
    from heksher_shm._shm.segment import Segment

    setting_decoder = msgspec.json.Decoder(proto.QuerySetting)
    specs = specs_from(params["settings"])
    segment = Segment.open(os.path.join(params["shm_dir"], "publish.seg"))
    update, term = _engine_update(segment, specs)
    call, _ = update(None)
    with httpx.Client(base_url=params["url"], timeout=120) as http:
        response = http.request(call.method, call.path, params=call.params)
    response.raise_for_status()
    content = response.content
    gc.collect()
    first = time.perf_counter()
    update(response)
    first_s = time.perf_counter() - first
    totals, decode, blobs_s, head_s, write_s = [], [], [], [], []
    for _ in range(params["repeats"]):
        start = time.perf_counter()
        update(response)
        totals.append(time.perf_counter() - start)
        # The same work in parts, with the functions the engine uses.
        t0 = time.perf_counter()
        result = proto.decode(proto.QUERY, 200, content, proto.RawQueryResponse)
        settings = {name: setting_decoder.decode(raw) for name, raw in result.settings.items()}
        t1 = time.perf_counter()
        built = [blob_of(settings[name]) for name in sorted(settings)]
        t2 = time.perf_counter()
        head = encode_head(
            Head(
                format=FORMAT,
                term=1,
                published=time.time(),
                context_features=list(CONTEXT_FEATURES),
                settings=[],
                outcomes={},
                ok=True,
            )
        )
        t3 = time.perf_counter()
        segment.publish(head, [b for b, _, _ in built], term)
        t4 = time.perf_counter()
        # Nothing of the parts may stay alive into the next engine run: a bigger heap makes
        # the collector's passes during decoding slower, which is not the engine's doing.
        del result, settings, built
        gc.collect()
        decode.append(t1 - t0)
        blobs_s.append(t2 - t1)
        head_s.append(t3 - t2)
        write_s.append(t4 - t3)
    update(response)  # leave a complete engine snapshot in both slots
    status = segment.status()
    current = next(s for s in status.slots if s.index == status.current_slot)
    rules = sum(
        len(s.rules) for s in proto.decode(proto.QUERY, 200, content, proto.QueryResponse).settings.values()
    )
    emit(
        "result",
        rules=rules,
        json_bytes=len(content),
        file_bytes=os.stat(segment.path).st_size,
        snapshot_bytes=current.length,
        first_s=first_s,
        total_s=totals,
        decode_s=decode,
        blobs_s=blobs_s,
        head_s=head_s,
        write_s=write_s,
        peer_apply_s=[_peer_apply(content, specs) for _ in range(params["peer_repeats"])],
    )
    segment.close()


def run(r: Run) -> dict[str, Any]:
    service = r.service
    sizes = (1, 10) if r.quick else (1, 10, 100)
    repeats = 3 if r.quick else 5
    rows = []
    series: dict[str, Any] = {
        "rules": [],
        "publish_ms": [],
        "json_mib": [],
        "file_mib": [],
        "snapshot_mib": [],
    }
    series["peer_apply_ms"] = []
    for per in sizes:
        grow_big(service, r.shared, per)
        child = r.spawn(
            MODULE,
            {
                "url": service.url,
                "settings": {"kind": "big", "prefix": service.prefix},
                "shm_dir": r.shm_dir(f"publish-{per}"),
                "repeats": repeats,
                "peer_repeats": 1 if per == 100 else 3,
            },
            label=f"{NAME}-{per}",
        )
        result = child.expect("result", timeout=300)
        child.stop()
        total = summary([x * 1000 for x in result["total_s"]])
        peer_apply = summary([x * 1000 for x in result["peer_apply_s"]])
        rules = result["rules"]
        parts = {
            k: summary([x * 1000 for x in result[k]])["median"] for k in ("decode_s", "blobs_s", "write_s")
        }
        log(
            f"{NAME}: {rules} rules: publish {total['median']:.1f} ms "
            f"(decode {parts['decode_s']:.1f}, blobs {parts['blobs_s']:.1f}, write {parts['write_s']:.1f}); "
            f"JSON {result['json_bytes'] / 2**20:.2f} MiB, file {result['file_bytes'] / 2**20:.2f} MiB, "
            f"snapshot {result['snapshot_bytes'] / 2**20:.2f} MiB; peer apply {peer_apply['median']:.0f} ms"
        )
        size_ratio = result["file_bytes"] / result["json_bytes"]
        series["rules"].append(rules)
        series["publish_ms"].append(total["median"])
        series["peer_apply_ms"].append(peer_apply["median"])
        series["json_mib"].append(result["json_bytes"] / 2**20)
        series["file_mib"].append(result["file_bytes"] / 2**20)
        series["snapshot_mib"].append(result["snapshot_bytes"] / 2**20)
        rows.append(
            {
                "label": f"Publish, {rules:,} rules",
                "unit": "ms",
                "ours": total,
                "peer": None,
                "ratio": None,
                "target": "<= 300 ms" if per == 100 else "",
                "met": total["median"] <= 300 if per == 100 else None,
                "note": (
                    f"decode {parts['decode_s']:.1f} + blobs {parts['blobs_s']:.1f} + "
                    f"segment write {parts['write_s']:.1f} ms; "
                    f"first publish {result['first_s'] * 1000:.0f} ms; "
                    f"peer, per process: parse + apply {peer_apply['median']:.0f} ms"
                ),
                "parts_ms": parts,
                "peer_apply_ms": peer_apply,
            }
        )
        rows.append(
            {
                "label": f"Segment file / JSON size, {rules:,} rules",
                "unit": "x",
                "ours": summary([size_ratio]),
                "peer": None,
                "ratio": None,
                "target": "<= 2x",
                "met": size_ratio <= 2,
                "note": (
                    f"file {result['file_bytes'] / 2**20:.2f} MiB (two slots), snapshot "
                    f"{result['snapshot_bytes'] / 2**20:.2f} MiB, JSON {result['json_bytes'] / 2**20:.2f} MiB"
                ),
                "bytes": {k: result[k] for k in ("json_bytes", "file_bytes", "snapshot_bytes")},
            }
        )
    return {
        "case": NAME,
        "title": TITLE,
        "target": TARGET,
        "params": {"settings": 1000, "rules_per_setting": list(sizes), "repeats": repeats},
        "rows": rows,
        "series": series,
    }


if __name__ == "__main__":
    child_main(body)
