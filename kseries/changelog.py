"""Commit messages and the cover letter, rendered from jinja2 templates in templates/.

A template's first line is the subject, then a blank line, then the body. Prose lives in the
templates; the trailers are appended by code (kseries.trailers), never written by hand.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from kseries import trailers
from kseries.errors import ToolkitError
from kseries.series import Patch, Series


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


class Changelog:
    """Renders every message of one series; one jinja2 environment, StrictUndefined."""

    def __init__(self, series: Series) -> None:
        self.series = series
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(series.templates_dir),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
            autoescape=False,
        )

    def message(self, patch: Patch) -> Message:
        """The commit message of `patch`, trailers generated and checked."""
        subject, body = self._render(patch.template, patch=patch)
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

    def cover_letter(self) -> Message:
        subjects = [self.message(p).subject for p in self.series.patches]
        subject, body = self._render(self.series.cover_template, subjects=subjects)
        return Message(subject, body)

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
        subject, _, body = text.strip().partition("\n")
        body = body.strip("\n")
        if not subject.strip() or not body.strip():
            raise ToolkitError(
                f"{path}: renders no subject or no body",
                "the first line is the subject, then a blank line, then the body",
            )
        if not text.strip().split("\n")[1:2] == [""]:
            raise ToolkitError(
                f"{path}:2: the subject must be followed by a blank line",
                "keep the subject to one line",
            )
        return subject.strip(), body


def _template_line(error: Exception, path: Path) -> int | str:
    """The line of `path` a jinja2 runtime error came from (jinja2 maps it into the traceback)."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename == str(path):
            return frame.lineno or "?"
    return "?"
