"""Commit messages and the cover letter, rendered from jinja2 templates in templates/.

A template's first line is the subject, then a blank line, then the body. Prose lives in the
templates; the trailers are appended by code (kseries.trailers), never written by hand.
"""

from __future__ import annotations

import difflib
import re
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_plus

import jinja2

from kseries import series as series_stage
from kseries import style, trailers
from kseries.config import Config
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree
from kseries.review.data import DEFAULT_ARCHIVE
from kseries.series import Patch, Series

if TYPE_CHECKING:
    from kseries.evidence import Evidence


@dataclass(frozen=True)
class Message:
    """A rendered changelog: subject, body and (for commits) the trailer block."""

    subject: str
    body: str
    trailers: tuple[trailers.Trailer, ...] = ()

    def __str__(self) -> str:
        parts = [self.subject, self.body]
        if self.trailers:
            parts.append("\n".join(str(t) for t in self.trailers))
        return "\n\n".join(parts) + "\n"


@dataclass(frozen=True)
class Edit:
    """A commit message on the branch that is not what its template renders. Prose lives in
    templates/, so it cannot be exported: it is shown, for the user to move by hand."""

    patch: Patch
    template: Path
    diff: str  # unified, from the rendered message to the branch's


@dataclass(frozen=True)
class Companion:
    """A series this one is half of, as the cover letter links it: its cover subject, and
    its sent cover letter's link, or (not sent yet) a search of the archive for the subject."""

    subject: str
    link: str
    sent: bool

    @classmethod
    def of(cls, configs: Path, name: str) -> Companion:
        """Series `name` (a --series name) of the project whose configs/ is `configs`."""
        config = Config.load(configs, name)
        other = series_stage.load(config)
        subject = Changelog(other, companions=False).cover_subject()
        if other.sent:
            return cls(subject, other.sent[-1].link, True)
        archive = str(config.setting("review.archive", DEFAULT_ARCHIVE)).rstrip("/")
        search = quote_plus('s:"' + subject + '"')
        return cls(subject, f"{archive}/?q={search}", False)


class Changelog:
    """Renders every message of one series; one jinja2 environment, StrictUndefined.

    `companions`: whether the cover letter names the companion series (false while one is
    being rendered for another's cover letter, so two series naming each other terminate)."""

    def __init__(self, series: Series, *, companions: bool = True) -> None:
        self.series = series
        self.with_companions = companions
        self.env = jinja2.Environment(
            loader=_Loader(series.templates_dir),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
            autoescape=False,
        )

    def message(self, patch: Patch) -> Message:
        """The commit message of `patch`, its prose and trailers generated and checked."""
        subject, body = self._render(patch.template, patch=patch)
        style.check_commit(
            subject,
            body,
            prefixes=self.series.shortlog_prefixes,
            where=f"{self.series.templates_dir / patch.template}: {patch.label}",
        )
        block = trailers.generate(patch, self.series.submitter)
        trailers.check(
            block,
            author=patch.author.ident,
            submitter=self.series.submitter.ident,
            where=f"{self.series.source}: {patch.label}",
        )
        return Message(subject, body, tuple(block))

    def messages(self) -> list[Message]:
        return [self.message(patch) for patch in self.series.patches]

    def edits(self, tree: WorkTree, commits: Sequence[str]) -> list[Edit]:
        """Each of the series' commits (in order) whose message differs from the rendered one."""
        shown = tree.git("show", "-s", "--format=%B%x00", *commits).split("\0")[: len(commits)]
        edits = []
        for sha, branch, patch in zip(commits, shown, self.series.patches, strict=True):
            rendered, actual = str(self.message(patch)).strip(), branch.strip()
            if rendered != actual:
                template = self.series.templates_dir / patch.template
                diff = difflib.unified_diff(
                    rendered.splitlines(),
                    actual.splitlines(),
                    f"{template} (rendered)",
                    f"{sha[:12]} ({patch.label})",
                    lineterm="",
                )
                edits.append(Edit(patch, template, "\n".join(diff)))
        return edits

    def cover_letter(self, evidence: Evidence | None = None) -> Message:
        """The cover letter, its subject held to the shortlog rules. Its body is not wrapped
        by rule: it never reaches git log, and may quote subjects up to the hard limit.
        `evidence` (send's, from a test report) fills templates/cover-testing.j2; without it
        that section renders nothing."""
        subjects = [self.message(p).subject for p in self.series.patches]
        companions = (
            [Companion.of(self.series.configs or Path(), name) for name in self.series.companions]
            if self.with_companions
            else []
        )
        subject, body = self._render(
            self.series.cover_template, subjects=subjects, evidence=evidence, companions=companions
        )
        where = f"{self.series.templates_dir / self.series.cover_template}: the cover letter"
        style.check_subject(subject, prefixes=self.series.shortlog_prefixes, where=where)
        return Message(subject, body)

    def cover_subject(self) -> str:
        """The cover letter's subject alone, for another series' cover letter to name: its
        patches' messages are not rendered (their subjects are not in it)."""
        subject, _ = self._render(
            self.series.cover_template, subjects=[], evidence=None, companions=[]
        )
        return subject

    def _render(self, name: str, **context: Any) -> tuple[str, str]:
        path = self.series.templates_dir / name
        try:
            text = self.env.get_template(name).render(
                series=self.series, people=self.series.people, base=self.series.base, **context
            )
        except jinja2.TemplateNotFound as e:
            raise ToolkitError(
                f"{path}: template not found",
                f"create it or fix 'template' in {self.series.source}",
            ) from e
        except jinja2.TemplateSyntaxError as e:
            raise ToolkitError(f"{path}:{e.lineno}: {e.message}", "fix the jinja2 syntax") from e
        except jinja2.UndefinedError as e:
            raise ToolkitError(
                f"{path}:{_template_line(e, path)}: {e.message}",
                "use a variable the series defines (series, patch, people, base)",
            ) from e
        # Line 1 is the subject even when it renders empty, which trim_blocks would hide by
        # dropping the line (`{% if x %}subject{% endif %}`): the marker says where it ended.
        before, marked, after = text.partition(_subject_end(name))
        text = _MARKS.sub("", before + after)
        if not (before if marked else text.partition("\n")[0]).strip():
            raise ToolkitError(
                f"{path}:1: the subject renders empty",
                "the first line is the subject (a comment or {% set %} goes after it): check "
                "the variables and {% if %} blocks on it",
            )
        subject, _, body = text.rstrip().partition("\n")
        if not body.strip():
            raise ToolkitError(
                f"{path}: renders no body",
                "the first line is the subject, then a blank line, then the body",
            )
        if body.split("\n", 1)[0] != "":
            raise ToolkitError(
                f"{path}:2: the subject must be followed by a blank line",
                "keep the subject to one line",
            )
        return subject.strip(), body.strip("\n")


def _subject_end(name: str) -> str:
    return f"\0subject-end:{name}\0"


_MARKS = re.compile(r"\0subject-end:[^\0]*\0")


class _Loader(jinja2.FileSystemLoader):
    """templates/, with the end of each template's first line marked in its source (no line
    is added, so error line numbers stay true). The marker is plain text after any tag there,
    so trim_blocks no longer drops that line's newline when it renders nothing."""

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        source, filename, uptodate = super().get_source(environment, template)
        first, newline, rest = source.partition("\n")
        try:
            last = list(environment.lex(first))[-1:]
        except jinja2.TemplateSyntaxError:  # a comment or raw block runs on past line 1
            return source, filename, uptodate
        if last and (last[0][1] not in _CLOSED or last[0][2].startswith("-")):
            return source, filename, uptodate  # a tag runs on, or `-%}` joins the next line
        return first + _subject_end(template) + newline + rest, filename, uptodate


_CLOSED = {"data", "block_end", "variable_end", "comment_end"}


def _template_line(error: Exception, path: Path) -> int | str:
    """The line of `path` a jinja2 runtime error came from (jinja2 maps it into the traceback)."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename == str(path):
            return frame.lineno or "?"
    return "?"
