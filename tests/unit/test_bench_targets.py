"""The benchmark's verdict lines: each target judged on the right cells, with the worst named."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "bench_run", Path(__file__).resolve().parents[2] / "bench" / "run.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_run"] = bench  # dataclasses look their module up by name
_spec.loader.exec_module(bench)


def result(system: str, conc: int, size: int, e2e: float, p99: float, lost: int = 0,
           dup: int = 0) -> bench.Result:
    return bench.Result(system, conc, size, e2e, e2e, p99 / 2, p99, "-", "-", lost, dup)


def cells(ratios: dict[tuple[int, int], tuple[float, float]]) -> dict:
    """(sessions, size) -> (e2e ratio, p99 ratio), against a Postfix of 100 msgs/s, 10 ms."""
    return {key: {"pochta": result("pochta", *key, 100 * e, 10 * p),
                  "postfix+dovecot": result("postfix+dovecot", *key, 100, 10)}
            for key, (e, p) in ratios.items()}


FULL = {(1, 4096): (1.2, 0.5), (10, 4096): (2.0, 0.6), (50, 4096): (3.0, 0.7),
        (1, 102400): (1.3, 0.5), (10, 102400): (2.1, 0.6), (50, 102400): (2.5, 0.9)}


def test_every_target_met_names_the_worst_cell() -> None:
    runs = [c["pochta"] for c in cells(FULL).values()]
    lines = bench.target_verdicts(cells(FULL), runs)
    assert lines == [
        "target met: end to end >= 2x Postfix at 10 and 50 sessions (worst 2.00, 10 x 4 KB)",
        "target met: end to end >= 1.2x Postfix with one session (worst 1.20, 1 x 4 KB)",
        "target met: p50 end-of-DATA at 1 and 10 sessions <= Postfix's (worst 0.60, 10 x 100 KB)",
        "target met: p99 end-of-DATA at every concurrency <= Postfix's (worst 0.90, 50 x 100 KB)",
        "target met: no message lost or duplicated (0 lost, 0 duplicated in 6 pochta runs)",
    ]


def test_a_missed_target_says_where() -> None:
    worse = {**FULL, (10, 4096): (1.4, 0.6), (1, 4096): (0.95, 0.5), (50, 4096): (3.0, 1.2)}
    runs = [result("pochta", 50, 4096, 300, 12, lost=1), result("pochta", 1, 4096, 95, 5, dup=2)]
    lines = bench.target_verdicts(cells(worse), runs)
    assert lines == [
        "target MISSED: end to end >= 2x Postfix at 10 and 50 sessions (worst 1.40, 10 x 4 KB)",
        "target MISSED: end to end >= 1.2x Postfix with one session (worst 0.95, 1 x 4 KB)",
        "target met: p50 end-of-DATA at 1 and 10 sessions <= Postfix's (worst 0.60, 10 x 100 KB)",
        "target MISSED: p99 end-of-DATA at every concurrency <= Postfix's (worst 1.20, 50 x 4 KB)",
        "target MISSED: no message lost or duplicated (1 lost, 2 duplicated in 2 pochta runs)",
    ]


def test_cpu_per_message_is_summed_over_the_processes_at_50_sessions() -> None:
    c = cells({(50, 4096): (3.0, 0.7)})
    c[(50, 4096)]["pochta"].cpu_per_1000 = "mda=0.20s mta=0.42s queue=0.17s"
    assert "target met: CPU per message at 50 sessions <= 1.2 ms, MTA + queue runner + MDA " \
           "(0.79 ms, 50 x 4 KB)" in bench.target_verdicts(c, [])
    c[(50, 4096)]["pochta"].cpu_per_1000 = "mda=0.40s mta=0.72s queue=0.17s"
    assert "target MISSED: CPU per message at 50 sessions <= 1.2 ms, MTA + queue runner + MDA " \
           "(1.29 ms, 50 x 4 KB)" in bench.target_verdicts(c, [])


def test_cells_without_postfix_or_other_sessions_are_not_judged() -> None:
    only_pochta = {(50, 4096): {"pochta": result("pochta", 50, 4096, 500, 30)}}
    other = cells({(20, 4096): (0.5, 3.0)})  # no target is set at 20 sessions
    assert bench.target_verdicts({**only_pochta, **other}, []) == []


def test_memory_targets() -> None:
    assert bench.memory_verdicts(1000, 85.9, 50, 1.7) == [
        "target met: 1000 idle sessions under 100 MB of MTA RSS (85.9 MB)",
        "target met: a 50 MB message raises the MTA's peak RSS by under 10 MB (+1.7 MB)",
    ]
    assert bench.memory_verdicts(1000, 100.0, 50, 10.0)[0].startswith("target MISSED")
    assert bench.memory_verdicts(1000, 100.0, 50, 10.0)[1].startswith("target MISSED")
    assert bench.memory_verdicts(10, 50.0, 5, 1.0) == []
