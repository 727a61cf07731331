"""`invoke pipeline`'s test runs, as data: [[pipeline.run]] in configs/testboxes.toml.

Each run is one `invoke test-remote` of the series kernel beside its base: the three-MMU table
on the local boxes, then the kernel+QEMU pair's matrix on local-pair. A run's boxes and tests
may name other series ("series:NAME" files, a box's qemu.binary "series:NAME"); the pipeline
puts each of those on its own base first, as it does the kernel series, so that what it
tests is what would be sent today.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kseries.config import STRINGS, Keys, Rows
from kseries.testbox import suite
from kseries.testbox.box import TestboxConfig

PIPELINE = Keys({"run": Rows(Keys({"boxes": STRINGS, "tests": STRINGS}))})


@dataclass(frozen=True)
class TestRun:
    """One test-remote run: these boxes side by side, these tests (none: the default ones)."""

    __test__ = False  # not a pytest class, despite the name

    boxes: tuple[str, ...]
    tests: tuple[str, ...] = ()


def runs(settings: TestboxConfig) -> list[TestRun]:
    """The configured runs, every box and test checked now (before the pipeline's first
    stage); none configured: one run on the default box."""
    files = settings.files
    rows = files.table("pipeline", PIPELINE).get("run", [])
    where = files.where.table("pipeline")
    known = suite.load_tests(settings)
    plan = []
    for index, row in enumerate(rows):
        if not row.get("boxes"):
            raise where.row("run", index).error("boxes", "a run needs boxes", 'boxes = ["local"]')
        run = TestRun(tuple(row["boxes"]), tuple(row.get("tests", ())))
        for name in run.boxes:
            settings.box(name)
        suite.select(known, run.tests)
        plan.append(run)
    return plan or [TestRun(("",))]


def series_used(settings: TestboxConfig, plan: Sequence[TestRun]) -> list[str]:
    """The other series the runs build: the boxes' QEMUs first, then the tests' files."""
    names: dict[str, None] = {}
    known = suite.load_tests(settings)
    for run in plan:
        for box in (settings.box(name) for name in run.boxes):
            if box.qemu is not None and box.qemu.series:
                names[box.qemu.series] = None
    for run in plan:
        for spec in suite.select(known, run.tests):
            for source in spec.files.values():
                if source.kind == "series":
                    names[source.value] = None
    return list(names)
