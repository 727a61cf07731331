"""More than one series as data: `--series NAME` picks configs/NAME/, whose patches and
templates sit in patches/NAME/ and templates/NAME/; the boxes stay configs/'s. One workspace per
task: configs/ read once, the series loaded once, the tree opened once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kseries import series as series_stage
from kseries import tree as tree_stage
from kseries.changelog import Changelog
from kseries.config import Config
from kseries.errors import ToolkitError
from kseries.workspace import Workspace
from tests.conftest import Project, git, invoke, one_error


def second_series(project: Project, key: str = "other") -> Path:
    """A copy of the demo series as configs/KEY/, with its own name, diffs and templates."""
    configs = project.configs / key
    configs.mkdir()
    text = (project.configs / "series.toml").read_text().replace('name = "demo"', 'name = "twin"')
    (configs / "series.toml").write_text(text)
    shutil.copytree(project.root / "patches", project.root / "patches" / key, dirs_exist_ok=True)
    shutil.copytree(project.root / "templates", project.root / "templates" / key)
    (project.root / "templates" / key / "cover.j2").write_text("twin: The other cover\n\nIt.\n")
    return configs


def test_a_series_is_a_directory_of_configs(project: Project) -> None:
    second_series(project)
    default = Workspace.open()
    assert default.config.directory == project.configs and default.config.series_key == ""
    assert default.series.name == "demo"
    assert default.series.patches_dir == project.root / "patches"
    other = Workspace.open("other")
    assert other.config.series_key == "other" and other.config.project == project.root
    assert other.series.name == "twin"
    assert other.series.patches_dir == project.root / "patches" / "other"
    assert other.series.templates_dir == project.root / "templates" / "other"
    assert str(Changelog(other.series).cover_letter()).startswith("twin: The other cover")
    # the default series answers to its own [series] name too
    assert Workspace.open("demo").config.directory == project.configs


def test_the_boxes_are_shared_and_local_toml_is_per_series(project: Project) -> None:
    configs = second_series(project)
    (project.configs / "testboxes.toml").write_text('[box.shared]\nhost = "10.0.0.1"\n')
    (project.configs / "local.toml").write_text(
        '[tree]\npath = "/the/kernel"\n\n[box.mine]\nhost = "10.0.0.2"\n'
    )
    (configs / "local.toml").write_text('[tree]\npath = "/the/qemu"\n')
    other = Config.load(series="other")
    assert other.setting("tree.path") == "/the/qemu"  # configs/local.toml's tree is the kernel's
    assert Config.load().setting("tree.path") == "/the/kernel"
    assert sorted(Workspace(other).boxes.names()) == ["mine", "shared"]


def test_an_unknown_series_is_one_line_naming_the_known_ones(project: Project) -> None:
    second_series(project)
    with pytest.raises(ToolkitError, match=r"--series nope: no such series") as caught:
        Config.load(series="nope")
    assert caught.value.hint == "series here: demo, other"
    one_error(
        invoke(project, "changelog", "--series", "../configs"),
        f"--series ../configs: no such series ({project.configs / '../configs/series.toml'} "
        "does not exist)",
        "series here: demo, other",
    )


def test_each_task_takes_series(project: Project) -> None:
    second_series(project)
    done = invoke(project, "changelog", "--series", "other")
    assert done.returncode == 0, done.stderr
    assert "twin: The other cover" in done.stdout
    for task in ("rebase", "export", "prepare", "pipeline", "build", "check", "send-series"):
        assert "--series=STRING" in invoke(project, "--help", task).stdout, task
    for task in ("trailers", "new-version", "status", "test-remote", "changelog"):
        assert "--series=STRING" in invoke(project, "--help", task).stdout, task


def test_a_workspace_makes_each_part_once(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[Path] = []
    opens: list[str] = []
    real_load, real_open = series_stage.load, tree_stage.open_tree
    monkeypatch.setattr(series_stage, "load", lambda c: loads.append(c.directory) or real_load(c))
    monkeypatch.setattr(
        tree_stage, "open_tree", lambda c, o, log: opens.append(o) or real_open(c, o, log)
    )
    ws = Workspace.open(tree=str(project.tree))
    assert ws.tree == str(project.tree)  # not opened yet: a stage may check its inputs first
    for _ in range(3):
        assert ws.series.branch == "demo-v2"
        assert ws.work.path == project.tree
    assert ws.tree is ws.work
    assert loads == [project.configs] and opens == [str(project.tree)]
    assert git(project.tree, "rev-parse", "--abbrev-ref", "HEAD").strip() == "master"
