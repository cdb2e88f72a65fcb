"""The garbage collector's work in a server process, for a profile run:

    PYTHONPATH=benchmarks/gc_probe .venv/bin/python -m benchmarks.profile --scenario check

Python imports this module at start-up when its folder is on PYTHONPATH;
only a process started as `... serve` (the server the profile starts)
records anything. Every two seconds it writes, to gc-probe-<pid>.txt in
GC_PROBE_DIR (the temporary folder by default), each generation's
collections since the process started, the milliseconds spent in them and
the objects they freed. With GC_PROBE_CENSUS=1 it stops counting after
CENSUS_AFTER_S and writes, once, what half a second of calls then left for
the collector (gc.DEBUG_SAVEALL: the types of the objects in reference
cycles), which is how grpc.aio's cycle a call was found
(benchmarks/README.md, "The collector").
"""

import collections
import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

CENSUS_AFTER_S = 11

if "serve" in sys.argv:
    _out = Path(os.environ.get("GC_PROBE_DIR", tempfile.gettempdir())) / f"gc-probe-{os.getpid()}.txt"
    # Per generation: collections, seconds, objects freed.
    _stats = {generation: [0, 0.0, 0] for generation in range(3)}
    _started = [0.0]
    _census: list[str] = []

    def _timed(phase: str, info: dict) -> None:
        if _census:
            return  # the census's own collections, and the run after it, are not counted
        if phase == "start":
            _started[0] = time.perf_counter()
            return
        figures = _stats[info["generation"]]
        figures[0] += 1
        figures[1] += time.perf_counter() - _started[0]
        figures[2] += info["collected"]

    def _take_census() -> None:
        _census.append("(the figures above stop here)")
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        time.sleep(0.5)
        gc.collect()
        kinds = collections.Counter(type(o).__qualname__ for o in gc.garbage)
        gc.set_debug(0)
        gc.garbage.clear()
        _census.append(f"in reference cycles after 0.5 s of calls: {sum(kinds.values())} objects")
        _census.extend(f"  {count} {kind}" for kind, count in kinds.most_common(12))

    def _report() -> None:
        started = time.monotonic()
        census_wanted = os.environ.get("GC_PROBE_CENSUS") == "1"
        while True:
            time.sleep(2)
            if census_wanted and not _census and time.monotonic() - started > CENSUS_AFTER_S:
                _take_census()
            lines = [f"generation {g}: {n} collections, {s * 1000:.1f} ms, {freed} objects freed"
                     for g, (n, s, freed) in _stats.items()]
            lines.append(f"frozen objects: {gc.get_freeze_count()}, thresholds: {gc.get_threshold()}")
            _out.write_text("\n".join([*lines, *_census]) + "\n")

    gc.callbacks.append(_timed)
    threading.Thread(target=_report, name="gc-probe", daemon=True).start()
