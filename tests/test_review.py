"""The review loop: the sent record, trailers from replies, the next version, status.

The receiving end is real: a public-inbox (Debian's public-inbox: -init -V2, -mda, -httpd on
127.0.0.1) fed by an aiosmtpd SMTP server that hands each mail to public-inbox-mda, and the
maintainer applies with b4 from PyPI (`b4 shazam`). The series is the scratch project's
two-patch series on its small tree; that tree is no kernel tree, so its scripts/checkpatch.pl
is a stand-in that reports a clean patch (checkpatch itself runs in tests/test_send.py).
"""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import os
import shutil
import smtplib
import subprocess
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiosmtpd.controller import Controller

from kseries import series as series_stage
from kseries.config import Config
from kseries.errors import ToolkitError
from kseries.rebase import Rebase
from kseries.review import harvest as harvest_stage
from kseries.review import sent as sent_stage
from kseries.send import Postman, SendSettings
from kseries.testbox.qemu import free_port
from tests.conftest import Project, git, invoke, one_error
from tests.test_send import fake_checkpatch

LIST = "list@example.org"
CHANGE_ID = "20261201-demo-0123456789ab"
B4 = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "b4")


class ToInbox:
    """An aiosmtpd handler: each mail for the list goes to public-inbox-mda, as a list server
    hands mail to its archive; every mail is also kept."""

    def __init__(self, env: dict[str, str] | None) -> None:
        self.env = env
        self.mails: list[EmailMessage] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.mails.append(
            email.message_from_bytes(envelope.content, policy=email.policy.default)  # type: ignore[arg-type]
        )
        if self.env is not None and LIST in envelope.rcpt_tos:
            done = subprocess.run(
                ["public-inbox-mda", "--no-precheck"],
                input=envelope.content,
                env={**self.env, "ORIGINAL_RECIPIENT": LIST},
                capture_output=True,
            )
            if done.returncode != 0:
                return f"451 public-inbox-mda: {done.stderr.decode()[-200:]}"
        return "250 OK"


@dataclass
class Lists:
    """The list: its SMTP port, the inbox's URL, and the mails it took."""

    smtp: int
    url: str
    handler: ToInbox

    def post(self, mail: EmailMessage) -> None:
        with smtplib.SMTP("127.0.0.1", self.smtp) as client:
            client.send_message(mail)


def _wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    for _ in range(200):
        if process.poll() is not None:
            raise AssertionError(f"public-inbox-httpd died: {log.read_text()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.05)
    raise AssertionError("public-inbox-httpd did not answer")


@pytest.fixture
def lists(tmp_path: Path) -> Iterator[Lists]:
    """A real public-inbox served over HTTP, fed through SMTP."""
    home = tmp_path / "pi"
    home.mkdir()
    env = {**os.environ, "PI_CONFIG": str(home / "config"), "HOME": str(home)}
    http = free_port()
    url = f"http://127.0.0.1:{http}/test"
    subprocess.run(
        ["public-inbox-init", "-V2", "test", str(home / "inbox"), url, LIST],
        env=env,
        check=True,
        capture_output=True,
    )
    git(home, "config", "-f", str(home / "config"), "publicinboxmda.spamcheck", "none")
    log = home / "httpd.log"
    with log.open("w") as out:
        httpd = subprocess.Popen(
            ["public-inbox-httpd", "-l", f"http://127.0.0.1:{http}"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait_for_port(http, httpd, log)
        handler = ToInbox(env)
        smtp = free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=smtp)
        controller.start()
        try:
            yield Lists(smtp, url, handler)
        finally:
            controller.stop()
    finally:
        httpd.terminate()
        httpd.wait(timeout=10)


def configure(project: Project, smtp: int, archive: str) -> None:
    """The scratch series mailed to the maintainer and the list, with b4's change-id."""
    (project.configs / "toolkit.toml").write_text(
        "[send]\nget_maintainer = false\n"
        f'to = ["maint", "{LIST}"]\n'
        f'[send.smtp]\nserver = "127.0.0.1"\nport = "{smtp}"\n'
        f'[review]\narchive = "{archive}"\ntimeout = 10\n'
    )
    series = project.configs / "series.toml"
    series.write_text(
        series.read_text().replace(
            'cover_template = "cover.j2"\n',
            f'cover_template = "cover.j2"\nchange_id = "{CHANGE_ID}"\n',
        )
    )
    (project.root / "templates" / "cover.j2").write_text(
        "demo: The cover\n\nTwo patches.\n"
        "{% for v in range(series.version - 1, 0, -1) %}\n"
        '{% include "changes-since-v%d.j2" % v ignore missing %}\n'
        "{% endfor %}\n"
        "{% for sent in series.sent if sent.version < series.version %}\n"
        "v{{ sent.version }}: {{ sent.link }}\n"
        "{% endfor %}\n"
    )
    fake_checkpatch(project.tree)  # a clean verdict: the toy tree has no checkpatch.pl


def run_ok(project: Project, *args: str) -> str:
    done = invoke(project, *args, cwd=project.root)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def send_cli(project: Project, out: Path) -> subprocess.CompletedProcess[str]:
    """`invoke send-series --send --yes` of the scratch series, mails written into `out`."""
    return invoke(
        project,
        "send-series",
        "--tree",
        str(project.tree),
        "--send",
        "--yes",
        "--out",
        str(out),
        cwd=project.root,
    )


def send(project: Project, out: Path) -> str:
    run_ok(project, "rebase", "--tree", str(project.tree))
    done = send_cli(project, out)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def review_toml(project: Project) -> dict:
    return tomllib.loads((project.configs / "review.toml").read_text())


def reply(to: EmailMessage, sender: str, text: str) -> EmailMessage:
    """A reply in the thread, as a mail client writes one (In-Reply-To and References)."""
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = LIST
    mail["Subject"] = "Re: " + str(to["Subject"])
    mail["Date"] = formatdate()
    mail["Message-ID"] = make_msgid(domain="example.org")
    mail["In-Reply-To"] = to["Message-ID"]
    mail["References"] = " ".join(filter(None, [str(to.get("References", "")), to["Message-ID"]]))
    mail.set_content(text)
    return mail


def text(mail: EmailMessage) -> str:
    """A received mail's text, its SMTP line ends back to \\n."""
    return mail.get_content().replace("\r\n", "\n")


def quoting(mail: EmailMessage) -> str:
    return "\n".join(f"> {line}" for line in text(mail).splitlines()[:12])


def b4(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HOME": str(repo.parent),
        "XDG_CACHE_HOME": str(repo.parent / "b4-cache"),
        "XDG_CONFIG_HOME": str(repo.parent / "b4-config"),
        "GIT_COMMITTER_NAME": "Max Maintainer",
        "GIT_COMMITTER_EMAIL": "max@example.org",
    }
    return subprocess.run(
        [B4, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )


def maintainer_repo(project: Project, url: str) -> Path:
    repo = project.root.parent / "maintainer" / "linux"
    repo.parent.mkdir()
    git(repo.parent, "clone", "-q", "-b", "next", str(project.upstream), str(repo))
    for key, value in (
        ("b4.midmask", f"{url}/%s"),
        ("b4.linkmask", f"{url}/%s"),
        ("b4.attestation-policy", "off"),
        ("user.name", "Max Maintainer"),
        ("user.email", "max@example.org"),
    ):
        git(repo, "config", key, value)
    return repo


def shazam(repo: Path, base: str, cover: str, branch: str) -> str:
    """`b4 shazam` of a cover letter onto `base` in the maintainer's clone; the new tip."""
    git(repo, "checkout", "-q", "-b", branch, base)
    done = b4(repo, "shazam", cover)
    assert done.returncode == 0, done.stdout + done.stderr
    return git(repo, "rev-parse", "HEAD").strip()


def trailer_blocks(repo: Path, base: str, tip: str) -> list[str]:
    return git(repo, "log", "--reverse", "--format=%(trailers:only)%x00", f"{base}..{tip}").split(
        "\0"
    )[:-1]


@pytest.mark.slow
def test_round_trip_through_public_inbox_and_b4(project: Project, lists: Lists) -> None:
    started = laps = time.monotonic()
    timings = []

    def lap(step: str) -> None:
        nonlocal laps
        timings.append(f"{step} {time.monotonic() - laps:.1f} s")
        laps = time.monotonic()

    configure(project, lists.smtp, lists.url)
    tree = project.worktree()
    # 1. v2 goes out through SMTP into the inbox, and is recorded
    out = send(project, project.root / "mails-v2")
    assert "recorded in" in out
    v2 = review_toml(project)["sent"][0]
    assert v2["version"] == 2 and v2["change_id"] == CHANGE_ID and len(v2["patches"]) == 2
    assert tree.rev("refs/tags/sent/demo-v2") == tree.rev("demo-v2") == v2["tip"]
    cover, patch1, patch2 = lists.handler.mails
    assert cover["Message-ID"].strip("<>") == v2["cover"]
    assert f"\nchange-id: {CHANGE_ID}\n" in text(cover)
    lap("send v2")
    # 2. the maintainer's b4 shazam gives the series branch's tree and trailers
    repo = maintainer_repo(project, lists.url)
    base = v2["base"]
    got = shazam(repo, base, v2["cover"], "v2")
    assert git(repo, "rev-parse", f"{got}^{{tree}}") == tree.git("rev-parse", "demo-v2^{tree}")
    assert trailer_blocks(repo, base, got) == trailer_blocks(project.tree, base, "demo-v2")
    lap("b4 shazam v2")
    # 3. a review with a real Reviewed-by, and one that only quotes an Acked-by
    real = reply(
        patch1,
        "Max Maintainer <max@example.org>",
        "Nice.\n\nReviewed-by: Max Maintainer <max@example.org>\n",
    )
    quoted = reply(
        patch2,
        "Ann Author <ann@example.org>",
        f"Sam wrote:\n{quoting(patch2)}\n> Acked-by: Ann Author <ann@example.org>\n\nAgreed.\n",
    )
    lists.post(real)
    lists.post(quoted)
    lap("replies")
    # 4. trailers --apply over HTTP takes exactly the real one
    out = run_ok(project, "trailers", "--apply")
    assert review_toml(project)["trailer"] == [
        {
            "patch": 1,
            "key": "Reviewed-by",
            "person": "maint",
            "message_id": real["Message-ID"].strip("<>"),
            "version": 2,
        }
    ]
    assert "quoted, not the sender's: '> Acked-by: Ann Author <ann@example.org>'" in out
    lap("trailers --apply")
    # 5. v3: patch 2's changelog changes; the cover must say so before it can go
    (project.root / "templates" / "0002.j2").write_text(
        "demo: Change line 30\n\nAnd line 30 too, as asked.\n"
    )
    out = run_ok(project, "new-version", "--tree", str(project.tree))
    assert "started v3: demo-v3" in out and "changed since v2: patch 2 (message)" in out
    refused = send_cli(project, project.root / "mails-v3")
    assert refused.returncode == 1
    assert "no 'Changes since v2:' section" in refused.stdout
    assert len(lists.handler.mails) == 5  # nothing more went out
    (project.root / "templates" / "changes-since-v2.j2").write_text(
        "Changes since v2:\n - Say why in patch 2's changelog.\n"
    )
    send(project, project.root / "mails-v3")
    v3 = review_toml(project)["sent"][1]
    assert v3["version"] == 3 and v3["change_id"] == CHANGE_ID
    cover3 = lists.handler.mails[5]
    assert cover3["Subject"].startswith("[PATCH v3 0/2]")
    assert f"v2: {lists.url}/{v2['cover']}/" in text(cover3)
    lap("v3: new-version, refusal, send")
    # 6. b4 shazam of v3 carries the Reviewed-by; the inbox's v3 cover the same change-id
    got3 = shazam(repo, v3["base"], v3["cover"], "v3")
    blocks = trailer_blocks(repo, v3["base"], got3)
    assert "Reviewed-by: Max Maintainer <max@example.org>\n" in blocks[0]
    assert "Reviewed-by" not in blocks[1] and "Acked-by" not in blocks[1]
    thread = urllib.request.urlopen(harvest_stage.thread_url(lists.url, v3["cover"])).read()
    assert f"\nchange-id: {CHANGE_ID}\r\n" in gzip.decompress(thread).decode()
    status = run_ok(project, "status", "--tree", str(project.tree))
    assert "v3: branch demo-v3" in status and "branch vs data: matches" in status
    lap("b4 shazam v3, status")
    print(f"round trip: {time.monotonic() - started:.1f} s ({', '.join(timings)})")


# --- the cases around it: on the scratch series sent to an SMTP server alone, replies in mbox --


@pytest.fixture
def sent(project: Project, tmp_path: Path) -> Iterator[list[EmailMessage]]:
    """v2 of the scratch series sent (to aiosmtpd alone) and recorded: its three mails."""
    handler = ToInbox(None)
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        configure(project, port, f"http://127.0.0.1:{free_port()}/test")  # nothing listens
        send_here(project, tmp_path / "mails")  # as send-series --send does, without start-ups
        yield handler.mails
    finally:
        controller.stop()


def send_here(project: Project, out: Path) -> None:
    """`invoke rebase` and `invoke send-series --send --yes`, in this process."""
    config = Config.load(project.configs)
    series = series_stage.load(config)
    tree = project.worktree()
    Rebase(tree, series, log=lambda _: None).start(remote="kvm-x86", branch="next")
    postman = Postman(tree, series, SendSettings(config, series))
    outbox = postman.format(out)
    postman.check(outbox, sending=True)
    assert not outbox.failed, outbox.failed
    postman.send(outbox, dry_run=False)
    sent_stage.record_send(config, tree, series, outbox, dry_run=False)


def write_mbox(path: Path, *mails: EmailMessage | bytes) -> Path:
    with path.open("wb") as out:
        for mail in mails:
            raw = mail if isinstance(mail, bytes) else mail.as_bytes()
            out.write(b"From mboxrd@z Thu Jan  1 00:00:00 1970\n" + raw.rstrip(b"\n") + b"\n\n")
    return path


def trailers_apply(project: Project, mbox: Path, *extra: str) -> str:
    return run_ok(project, "trailers", "--mbox", str(mbox), "--apply", *extra)


def configs(project: Project) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(project.configs.iterdir())}


def test_a_reply_naming_someone_new_adds_them_to_people(
    project: Project, sent: list[EmailMessage], tmp_path: Path
) -> None:
    mail = reply(
        sent[2], "Rita Reviewer <rita@example.org>", "Tested-by: Rita Reviewer <rita@example.org>\n"
    )
    out = trailers_apply(project, write_mbox(tmp_path / "r.mbox", mail))
    assert "applied 1 trailers" in out
    people = tomllib.loads((project.configs / "series.toml").read_text())["people"]
    assert people["rita"] == {"name": "Rita Reviewer", "email": "rita@example.org"}
    assert (
        f"# from {mail['Message-ID'].strip('<>')}" in (project.configs / "series.toml").read_text()
    )
    series = project.series()
    assert [p.ident for p in series.patches[1].tested_by] == ["Rita Reviewer <rita@example.org>"]
    assert series.patches[0].tested_by == ()


def test_two_reviewers_on_different_patches(
    project: Project, sent: list[EmailMessage], tmp_path: Path
) -> None:
    one = reply(
        sent[1], "Max Maintainer <max@example.org>", "Reviewed-by: Max Maintainer <max@example.org>"
    )
    two = reply(
        sent[2], "Rita Reviewer <rita@example.org>", "Acked-by: Rita Reviewer <rita@example.org>"
    )
    trailers_apply(project, write_mbox(tmp_path / "r.mbox", one, two))
    rows = review_toml(project)["trailer"]
    assert [(r["patch"], r["key"], r["person"], r["message_id"]) for r in rows] == [
        (1, "Reviewed-by", "maint", one["Message-ID"].strip("<>")),
        (2, "Acked-by", "rita", two["Message-ID"].strip("<>")),
    ]
    series = project.series()
    assert [p.key for p in series.patches[0].reviewed_by] == ["maint"]
    assert [p.key for p in series.patches[1].acked_by] == ["rita"]
    again = trailers_apply(project, tmp_path / "r.mbox")  # a second run adds nothing
    assert "nothing to apply" in again and len(review_toml(project)["trailer"]) == 2


def test_a_trailer_on_the_cover_letter_goes_to_every_patch(
    project: Project, sent: list[EmailMessage], tmp_path: Path
) -> None:
    mail = reply(
        sent[0],
        "Max Maintainer <max@example.org>",
        "For the series:\nAcked-by: Max Maintainer <max@example.org>\n",
    )
    trailers_apply(project, write_mbox(tmp_path / "r.mbox", mail))
    rows = review_toml(project)["trailer"]
    assert [(r["patch"], r["key"], r["person"]) for r in rows] == [
        (1, "Acked-by", "maint"),
        (2, "Acked-by", "maint"),
    ]


def test_only_the_reviewers_own_words_in_this_thread_count(
    project: Project, sent: list[EmailMessage], tmp_path: Path
) -> None:
    _, patch1, patch2 = sent
    nested = reply(
        reply(patch1, "Ann Author <ann@example.org>", "A question."),
        "Max Maintainer <max@example.org>",
        "Answered, then:\n\nReviewed-by: Max Maintainer <max@example.org>\n\n-- \n"
        "Tested-by: Sig Nature <sig@example.org>\n",
    )
    question = reply(patch1, "Ann Author <ann@example.org>", "A question.")
    nested.replace_header("In-Reply-To", question["Message-ID"])
    fixup = reply(
        patch2,
        "Rita Reviewer <rita@example.org>",
        "Like this?\n---\ndiff --git a/file.c b/file.c\n--- a/file.c\n+++ b/file.c\n"
        "@@ -1,2 +1,2 @@\nReviewed-by: Rita Reviewer <rita@example.org>\n",
    )
    elsewhere = reply(
        patch2, "Rita Reviewer <rita@example.org>", "Acked-by: Rita Reviewer <rita@example.org>"
    )
    elsewhere.replace_header("In-Reply-To", "<another-series@example.org>")
    elsewhere.replace_header("References", "<another-series@example.org>")
    mentions = reply(
        patch2, "Rita Reviewer <rita@example.org>", "Tested-by: Rita Reviewer <rita@example.org>"
    )
    mentions.replace_header(
        "In-Reply-To", "<another-series@example.org>"
    )  # References still has ours
    malformed = reply(patch2, "Rita Reviewer <rita@example.org>", "Reviewed-by: Rita Reviewer\n")
    mbox = write_mbox(tmp_path / "r.mbox", question, nested, fixup, elsewhere, mentions, malformed)
    out = trailers_apply(project, mbox)
    rows = review_toml(project)["trailer"]
    assert [(r["patch"], r["key"], r["person"]) for r in rows] == [(1, "Reviewed-by", "maint")]
    assert rows[0]["message_id"] == nested["Message-ID"].strip("<>")
    assert "ignored: inside a diff: 'Reviewed-by: Rita Reviewer <rita@example.org>'" in out
    assert out.count("ignored: not a reply in this thread") == 2
    assert "ignored: not one 'Name <address>': 'Reviewed-by: Rita Reviewer'" in out
    assert "Sig Nature" not in out


def test_a_broken_mail_in_the_mbox_is_named_and_the_others_read(
    project: Project, sent: list[EmailMessage], tmp_path: Path
) -> None:
    good = reply(
        sent[1], "Max Maintainer <max@example.org>", "Reviewed-by: Max Maintainer <max@example.org>"
    )
    undecodable = reply(sent[2], "Rita Reviewer <rita@example.org>", "x")
    raw = undecodable.as_bytes().replace(b'charset="utf-8"', b'charset="x-no-such-charset"')
    raw = raw.replace(b"\n\nx\n", b"\n\nReviewed-by: Rita Reviewer <rita@example.org>\n")
    headless = b"this is not a mail at all\n"
    out = trailers_apply(project, write_mbox(tmp_path / "r.mbox", good, raw, headless))
    assert [r["person"] for r in review_toml(project)["trailer"]] == ["maint"]
    assert "ignored: broken mail: its text cannot be decoded" in out
    assert "ignored: broken mail #3: no Message-ID or From header" in out


def test_an_inbox_that_is_down_is_one_error_and_changes_nothing(
    project: Project, sent: list[EmailMessage]
) -> None:
    before = configs(project)
    done = invoke(project, "trailers", "--apply", cwd=project.root)
    archive = tomllib.loads((project.configs / "toolkit.toml").read_text())["review"]["archive"]
    cover = sent[0]["Message-ID"].strip("<>")
    one_error(
        done,
        f"{archive}/{cover}/t.mbox.gz: the inbox did not answer: [Errno 111] Connection refused",
        "check [review] archive in configs/ and the network",
    )
    assert configs(project) == before


def test_a_trailer_on_a_patch_changed_since_is_warned_about_not_applied(
    project: Project, sent: list[EmailMessage], tmp_path: Path
) -> None:
    mail = reply(
        sent[2], "Max Maintainer <max@example.org>", "Reviewed-by: Max Maintainer <max@example.org>"
    )
    mbox = write_mbox(tmp_path / "r.mbox", mail)
    (project.root / "templates" / "0002.j2").write_text("demo: Change line 30\n\nReworded.\n")
    out = trailers_apply(project, mbox)
    assert "warning: patch 2 changed since v2 (message)" in out and "nothing to apply" in out
    assert "trailer" not in review_toml(project)
    status = run_ok(project, "status", "--tree", str(project.tree))
    assert "trailers collected, not applied: 1" in status
    out = trailers_apply(project, mbox, "--changed-too")
    assert [r["patch"] for r in review_toml(project)["trailer"]] == [2]


def test_a_version_is_sent_once_and_status_shows_it(
    project: Project, sent: list[EmailMessage], tmp_path: Path
) -> None:
    again = send_cli(project, tmp_path / "again")
    assert again.returncode == 1 and "v2 was sent on" in again.stdout
    status = run_ok(project, "status", "--tree", str(project.tree))
    assert "sent:\n  v2 on " in status and "sent/demo-v2;" in status
    assert "branch vs data: matches" in status
    assert "check: not run on this tip" in status


def test_new_version_of_an_unsent_series_is_refused_and_changes_nothing(project: Project) -> None:
    before = configs(project)
    one_error(
        invoke(project, "new-version", "--tree", str(project.tree), cwd=project.root),
        f"{project.configs / 'series.toml'}: v2 was never sent (configs/review.toml has no "
        "[[sent]] version = 2)",
        "send it first",
    )
    assert configs(project) == before


def test_the_changes_section_must_name_each_changed_patch() -> None:
    cover = (
        "Intro.\n\nChanges since v2:\n - Reword patch 1's changelog.\n - 3/3: new test\n"
        "   (and the demo: Change line 30 subject)\n\nv2: https://x/\n"
    )
    section = sent_stage.changes_section(cover, 2)
    assert section is not None and "v2: https" not in section
    assert sent_stage.names_patch(section, 1, "demo: Anything")
    assert sent_stage.names_patch(section, 3, "demo: Anything")
    assert sent_stage.names_patch(section, 2, "demo: Change line 30")
    assert not sent_stage.names_patch(section, 2, "demo: Something else")
    assert sent_stage.names_patch("- patches 4 and 5: x", 5, "demo: y")
    assert sent_stage.changes_section(cover, 1) is None


def test_the_real_cover_letter_of_v3_has_both_changes_and_the_v2_link(tmp_path: Path) -> None:
    from kseries.changelog import Changelog
    from kseries.paths import PROJECT
    from kseries.review.data import Edit, Sent, SentPatch

    for name in ("configs", "templates", "patches"):
        shutil.copytree(PROJECT / name, tmp_path / name)
    config = Config.load(tmp_path / "configs")
    v2 = series_stage.load(config)
    edit = Edit(config)
    edit.add_sent(
        Sent(
            2,
            v2.branch,
            "Tue, 01 Dec 2026 23:30:00 +0000",
            "a" * 40,
            "b" * 40,
            "sent/x",
            "",
            "cover.1.git.x@example.org",
            "https://lore.kernel.org/all/cover.1.git.x@example.org/",
            (),
            (),
            tuple(SentPatch(f"{n}.x@example.org", "s", "p", "d") for n in (1, 2, 3)),
        )
    )
    edit.set_version(3)
    edit.write(series_stage.load)
    (tmp_path / "templates" / "changes-since-v2.j2").write_text(
        "Changes since v2:\n - Reword patch 1.\n"
    )
    cover = Changelog(series_stage.load(Config.load(tmp_path / "configs"))).cover_letter().body
    assert "\n\nChanges since v2:\n - Reword patch 1.\n\nChanges since v1:\n" in cover
    assert "\nv2:\n  https://lore.kernel.org/all/cover.1.git.x@example.org/\n" in cover
    assert cover.index("v1:\n  https://lore") < cover.index("v2:\n  https://lore")


def test_a_bad_review_toml_is_one_error_naming_file_table_and_key(project: Project) -> None:
    path = project.configs / "review.toml"
    row = '[[trailer]]\npatch = 1\nkey = "Reviewed-by"\nperson = "maint"\nversion = 2\n'
    path.write_text(row + 'message_id = "a@b"\nmesage_id = "typo"\n')
    with pytest.raises(ToolkitError) as caught:
        project.series()
    assert caught.value.message == f"{path} [[trailer]] #1: unknown setting mesage_id"
    path.write_text(row.replace('"Reviewed-by"', '"Reviewd-by"') + 'message_id = "a@b"\n')
    with pytest.raises(ToolkitError, match=r"\[\[trailer\]\] #1: key must be one of Reviewed-by"):
        project.series()
    path.write_text(row.replace('"maint"', '"nobody"') + 'message_id = "a@b"\n')
    with pytest.raises(ToolkitError, match=r"#1: unknown person 'nobody'"):
        project.series()
    path.write_text(row + 'message_id = "a@b"\n')
    assert [p.key for p in project.series().patches[0].reviewed_by] == ["maint"]


def test_status_shows_the_verdicts_of_the_exact_tip(project: Project, tmp_path: Path) -> None:
    from kseries.review import status as status_stage

    series = project.series()
    tree = project.worktree()
    Rebase(tree, series, log=lambda _: None).start(remote="kvm-x86", branch="next")
    tip = tree.rev(series.branch)
    rows = [SimpleNamespace(gate="x86_64-kvm-W1", commit=tip, ok=True)]
    status_stage.record_check(tree, series.branch, rows)
    reports = tmp_path / "test-remote"
    for stamp, commit, verdict in (("20261201-1", tip, "pass"), ("20261201-2", "f" * 40, "fail")):
        (reports / stamp).mkdir(parents=True)
        (reports / stamp / "report.json").write_text(
            json.dumps(
                {
                    "kernel": {"commit": commit},
                    "runs": [{"box": "local", "label": "kernel", "verdict": verdict}],
                }
            )
        )
    shown = str(status_stage.status(series, tree, tmp_path / "out", reports))
    assert "check: x86_64-kvm-W1 ok" in shown
    assert "test-remote: local/kernel pass (20261201-1)" in shown
    assert "branch vs data: matches" in shown
    (project.root / "templates" / "0002.j2").write_text("demo: Change line 30\n\nReworded.\n")
    shown = str(status_stage.status(project.series(), tree, tmp_path / "out", reports))
    assert "patch 2 (0002.diff): message differ" in shown


def test_a_dry_run_shows_the_record_and_writes_nothing(project: Project, tmp_path: Path) -> None:
    configure(project, free_port(), "https://lore.kernel.org/all")
    run_ok(project, "rebase", "--tree", str(project.tree))
    before = configs(project)
    out = run_ok(project, "send-series", "--tree", str(project.tree), "--out", str(tmp_path / "o"))
    assert "a real send would record in" in out
    assert "tag sent/demo-v2 (not made: dry run)" in out
    assert "-> https://lore.kernel.org/all/cover." in out
    assert configs(project) == before
    assert project.worktree().rev("refs/tags/sent/demo-v2") is None
    status = run_ok(project, "status", "--tree", str(project.tree))
    assert "sent: nothing yet" in status


def test_an_edit_of_configs_refuses_to_write_over_a_concurrent_one(project: Project) -> None:
    from kseries.review.data import Edit

    edit = Edit(Config.load(project.configs))
    edit.set_version(3)
    path = project.configs / "series.toml"
    path.write_text(path.read_text() + "\n# edited meanwhile\n")
    before = configs(project)
    with pytest.raises(ToolkitError, match=r"series.toml changed while this ran"):
        edit.write(series_stage.load)
    assert configs(project) == before
