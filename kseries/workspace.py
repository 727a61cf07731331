"""What one task works on, made once: the series' configuration, the series, its tree, the
test boxes.

A task makes one `Workspace` from its --series and --tree options and hands it to each stage,
so `invoke pipeline` reads configs/ once, loads the series once and opens (or prepares) the
tree once, however many stages it runs. Each part is made on first use: `invoke changelog`
never opens a tree, `invoke build` never loads the series.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING

from kseries.config import Config

if TYPE_CHECKING:
    from kseries.gitrepo import WorkTree
    from kseries.series import Series
    from kseries.testbox.box import TestboxConfig

SERIES_HELP = (
    "which series: a directory under configs/ (e.g. qemu), or the default series' name "
    "(default: the kernel series, configs/ itself)"
)


class Workspace:
    """The configuration of one series, and what a stage derives from it, each made once."""

    def __init__(self, config: Config, tree: str = "", log: Callable[[str], None] = print) -> None:
        self.config = config
        self.tree_option = tree  # --tree: used as it is, instead of the configured tree
        self.log = log

    @classmethod
    def open(
        cls, series: str = "", tree: str = "", log: Callable[[str], None] = print
    ) -> Workspace:
        return cls(Config.load(series=series), tree, log)

    @cached_property
    def series(self) -> Series:
        from kseries import series as series_stage

        return series_stage.load(self.config)

    @cached_property
    def work(self) -> WorkTree:
        """--tree, else [tree] path, else the embedded default tree (prepared on first use)."""
        from kseries import tree as tree_stage

        return tree_stage.open_tree(self.config, self.tree_option, log=self.log)

    @property
    def tree(self) -> WorkTree | str:
        """The work tree if a stage before opened it, else the --tree option: for a stage
        that checks its other inputs before it opens (maybe downloads) a tree."""
        return self.__dict__.get("work", self.tree_option)

    @cached_property
    def boxes(self) -> TestboxConfig:
        from kseries.testbox.box import TestboxConfig

        return TestboxConfig.load(self.config)
