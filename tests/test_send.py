"""send-series: the real series as mails from the 7.2 tree, a real SMTP round trip on 127.0.0.1,
and the failures that must stop a send. The SMTP server is aiosmtpd, started by the test.

The tests marked slow need the 7.2 tree; the others work on a scratch project's small tree."""

from __future__ import annotations

import email
import email.policy
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from rich.console import Console

from kseries import series as series_stage
from kseries.config import Config
from kseries.errors import ToolkitError
from kseries.gitrepo import WorkTree
from kseries.paths import PROJECT
from kseries.rebase import ConflictError, Rebase
from kseries.send import MailCheck, PartialSend, Postman, SendSettings, report
from kseries.testbox.qemu import free_port
from kseries.tree import scratch_clone
from tests.conftest import SOURCE, Project, git, invoke, one_error, replace_line


class Inbox:
    """An aiosmtpd handler that keeps every mail, and can refuse the n-th."""

    def __init__(self, reject: int = 0) -> None:
        self.reject = reject
        self.seen = 0
        self.mails: list[email.message.EmailMessage] = []
        self.recipients: list[list[str]] = []  # each accepted mail's RCPT TO addresses

    async def handle_DATA(self, server, session, envelope) -> str:
        self.seen += 1
        if self.seen == self.reject:
            return "554 5.6.0 refused by the test"
        self.mails.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        self.recipients.append(list(envelope.rcpt_tos))
        return "250 OK"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> WorkTree:
    """A shared clone of the default tree with the series rebased onto it."""
    tree = WorkTree(scratch_clone(tmp_path_factory.mktemp("send") / "linux"))
    Rebase(tree, series_stage.load(Config.load()), log=lambda _: None).start(
        remote="kvm-x86", branch="next"
    )
    return tree


def scratch_configs(tmp_path: Path, local: str = "") -> Config:
    """The project's configs/, templates/ and patches/ copied, with a local.toml on top."""
    for name in ("configs", "templates", "patches"):
        shutil.copytree(PROJECT / name, tmp_path / name)
    (tmp_path / "configs" / "local.toml").write_text(local)
    return Config.load(tmp_path / "configs")


def postman(kernel: WorkTree, config: Config) -> Postman:
    """Without the Testing section: no test report of the rebased branch exists here."""
    series = series_stage.load(config)
    return Postman(kernel, series, SendSettings(config, series), testing=False)


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, port
    controller.stop()


def smtp_local(port: int) -> str:
    return f'[send.smtp]\nserver = "127.0.0.1"\nport = "{port}"\n'


@pytest.mark.slow
def test_dry_run_of_the_real_series(kernel: WorkTree, tmp_path: Path) -> None:
    man = postman(kernel, Config.load())
    outbox = man.format(tmp_path / "out")
    delivery = man.rehearse(outbox)  # the checks and send-email --dry-run, side by side
    assert outbox.checks and not outbox.failed, outbox.failed
    total = len(man.series.patches)
    assert [m.subject[:14] for m in outbox.mails] == [
        f"[PATCH v2 {n}/{total}]" for n in range(total + 1)
    ]
    cover = outbox.mails[0]
    assert "base-commit: " + outbox.base in cover.path.read_text()
    assert "*** SUBJECT HERE ***" not in cover.path.read_text()
    for mail in outbox.mails:
        assert "kvm@vger.kernel.org" in mail.to
        assert "Sean Christopherson <seanjc@google.com>" in mail.to
        assert not {a.lower() for a in mail.cc} & {a.lower() for a in mail.to}
    assert "linux-kernel@vger.kernel.org" in outbox.mails[1].cc
    assert "Anish Moorthy <amoorthy@google.com>" in outbox.mails[1].cc
    assert delivery.output.count("Dry-OK. Log says:") == total + 1
    assert len(delivery.sent) == total + 1


@pytest.mark.slow
def test_real_send_round_trip(kernel: WorkTree, tmp_path: Path, smtp) -> None:
    inbox, port = smtp
    man = postman(kernel, scratch_configs(tmp_path, smtp_local(port)))
    outbox = man.format(tmp_path / "out")
    man.check(outbox, sending=True)
    assert not outbox.failed, outbox.failed
    delivery = man.send(outbox, dry_run=False)
    assert len(delivery.sent) == len(outbox.mails) == len(inbox.mails)
    cover_id = inbox.mails[0]["Message-ID"]
    assert inbox.mails[0]["Subject"].startswith("[PATCH v2 0/")
    for mail in inbox.mails[1:]:
        assert mail["In-Reply-To"] == cover_id
        assert mail["References"] == cover_id
    received = tmp_path / "received.mbox"
    received.write_text(
        "".join(
            f"From mboxrd@z Thu Jan  1 00:00:00 1970\n{m.as_string()}\n" for m in inbox.mails[1:]
        )
    )
    kernel.git("checkout", "-q", "-b", "round-trip", outbox.base)
    try:
        kernel.git(
            "am",
            "-q",
            str(received),
            env={"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"},
        )
        assert kernel.git("rev-parse", "round-trip^{tree}") == kernel.git(
            "rev-parse", f"{outbox.branch}^{{tree}}"
        )
        authors = kernel.git("log", "--reverse", "--format=%an", f"{outbox.base}..round-trip")
        assert authors.splitlines()[0] == "Anish Moorthy"
    finally:
        kernel.git("checkout", "-q", outbox.branch)
        kernel.git("branch", "-q", "-D", "round-trip")


@pytest.mark.slow
def test_smtp_refusing_the_third_mail_reports_what_went_out(
    kernel: WorkTree, tmp_path: Path, smtp
) -> None:
    inbox, port = smtp
    inbox.reject = 3
    man = postman(kernel, scratch_configs(tmp_path, smtp_local(port)))
    outbox = man.format(tmp_path / "out")
    man.check(outbox, sending=True)
    with pytest.raises(PartialSend) as stop:
        man.send(outbox, dry_run=False)
    assert [m.path.name for m in stop.value.delivery.sent] == [
        m.path.name for m in outbox.mails[:2]
    ]
    assert "not sent: " + outbox.mails[2].path.name in stop.value.message
    assert "In-Reply-To" in stop.value.hint and str(outbox.mails[3].path) in stop.value.hint
    assert len(inbox.mails) == 2


@pytest.mark.slow
def test_checkpatch_error_blocks_the_send(kernel: WorkTree, tmp_path: Path, smtp) -> None:
    inbox, port = smtp
    config = scratch_configs(tmp_path, smtp_local(port))
    diff = next((tmp_path / "patches").glob("0001-*.diff"))
    diff.write_text(
        diff.read_text().replace(
            "+\tkvm_mmu_prepare_memory_fault_exit(vcpu, fault);",
            "+\tkvm_mmu_prepare_memory_fault_exit(vcpu, fault); ",
        )
    )
    series = series_stage.load(config)
    Rebase(kernel, series, log=lambda _: None).start(remote="kvm-x86", branch="next")
    try:
        man = Postman(kernel, series, SendSettings(config, series), testing=False)
        outbox = man.format(tmp_path / "out")
        man.check(outbox, sending=True)
        assert [c.name for c in outbox.failed] == ["checkpatch --strict"]
        assert "trailing whitespace" in outbox.failed[0].detail
        with pytest.raises(ToolkitError, match="not sending: 1 pre-send checks failed"):
            man.send(outbox, dry_run=False)
        assert inbox.mails == []
    finally:
        Rebase(kernel, series_stage.load(Config.load()), log=lambda _: None).start(
            remote="kvm-x86", branch="next"
        )


def test_missing_sender_identity_is_refused(tmp_path: Path) -> None:
    scratch_configs(tmp_path)
    path = tmp_path / "configs" / "series.toml"
    path.write_text(path.read_text().replace('submitter = "mikhail"', ""))
    with pytest.raises(ToolkitError, match=r"\[series\] submitter: is not set"):
        series_stage.load(Config.load(tmp_path / "configs"))


@pytest.mark.slow
def test_real_send_without_smtp_server_is_refused(kernel: WorkTree, tmp_path: Path) -> None:
    man = postman(kernel, scratch_configs(tmp_path))
    outbox = man.format(tmp_path / "out")
    man.check(outbox, sending=True)
    assert [c.name for c in outbox.failed] == ["sender identity"]
    with pytest.raises(ToolkitError, match="not sending"):
        man.send(outbox, dry_run=False)


# --- the scratch project: a two-patch series on a small tree, sent to aiosmtpd -----------------


def scratch_postman(
    project: Project, send: str = "", names: dict[str, str] | None = None
) -> Postman:
    """The scratch series with people renamed and a [send] table (no get_maintainer.pl in
    this tree), rebased onto its base as `invoke rebase` would."""
    path = project.configs / "series.toml"
    text = path.read_text()
    for old, new in (names or {}).items():
        assert f'name = "{old}"' in text
        text = text.replace(f'name = "{old}"', f'name = "{new}"')
    path.write_text(text)
    (project.configs / "toolkit.toml").write_text(f"[send]\nget_maintainer = false\n{send}")
    config = Config.load(project.configs)
    series = series_stage.load(config)
    Rebase(project.worktree(), series, log=lambda _: None).start(remote="kvm-x86", branch="next")
    return Postman(project.worktree(), series, SendSettings(config, series), testing=False)


def test_a_comma_in_a_name_is_one_recipient_on_the_wire(project: Project, tmp_path: Path, smtp):
    inbox, port = smtp
    man = scratch_postman(
        project,
        f'to = ["maint", "kvm@vger.kernel.org"]\n{smtp_local(port)}',
        {"Max Maintainer": "Bonzini, Paolo"},
    )
    outbox = man.format(tmp_path / "out")
    assert outbox.mails[1].to == ['"Bonzini, Paolo" <max@example.org>', "kvm@vger.kernel.org"]
    patch = outbox.mails[1].path.read_text()
    assert 'Suggested-by: "Bonzini, Paolo" <max@example.org>\n' in patch
    assert 'To: "Bonzini, Paolo" <max@example.org>, kvm@vger.kernel.org\n' in patch
    man.send(outbox, dry_run=False)
    assert inbox.recipients == [
        ["max@example.org", "kvm@vger.kernel.org", "ann@example.org"],  # the cover: every Cc
        ["max@example.org", "kvm@vger.kernel.org", "ann@example.org"],
        ["max@example.org", "kvm@vger.kernel.org"],
    ]
    to = inbox.mails[1]["To"].addresses
    assert [(a.display_name, a.addr_spec) for a in to] == [
        ("Bonzini, Paolo", "max@example.org"),
        ("", "kvm@vger.kernel.org"),
    ]


def test_an_unquoted_comma_address_in_send_config_is_refused(project: Project) -> None:
    with pytest.raises(
        ToolkitError, match=r"\[send\]: cc: 'Bonzini, Paolo <p@redhat.com>' is neither"
    ):
        scratch_postman(project, 'cc = ["Bonzini, Paolo <p@redhat.com>"]\n')


def test_a_non_ascii_author_passes_the_sign_off_check_and_is_sent(
    project: Project, tmp_path: Path, smtp
) -> None:
    inbox, port = smtp
    man = scratch_postman(
        project, f'to = ["kvm@vger.kernel.org"]\n{smtp_local(port)}', {"Ann Author": "Jörg Rödel"}
    )
    outbox = man.format(tmp_path / "out")
    patch = outbox.mails[1].path
    # format-patch encodes the From: header; the trailer and the Cc: we write must match it
    assert "From: =?UTF-8?q?J=C3=B6rg=20R=C3=B6del?= <ann@example.org>\n" in patch.read_text()
    assert "Signed-off-by: Jörg Rödel <ann@example.org>\n" in patch.read_text()
    cc = (
        "Cc: Max Maintainer <max@example.org>,\n =?utf-8?q?J=C3=B6rg_R=C3=B6del?= <ann@example.org>"
    )
    assert cc + "\n" in patch.read_text()  # folded at 78 columns
    assert man._trailer_rules(outbox.mails[1:]) == MailCheck("trailer rules", True)
    man.send(outbox, dry_run=False)
    # the submitter sends, so send-email moves the author's From: into the body, as git am reads it
    assert [str(m["From"]) for m in inbox.mails] == ["Sam Submitter <sam@example.org>"] * 3
    assert inbox.mails[1].get_content().splitlines()[:2] == [
        "From: Jörg Rödel <ann@example.org>",
        "",
    ]
    assert (
        str(inbox.mails[1]["Cc"])
        == "Max Maintainer <max@example.org>, Jörg Rödel <ann@example.org>"
    )


def test_version_one_is_unnumbered_and_passes_the_numbering_check(
    project: Project, tmp_path: Path
) -> None:
    (project.configs / "local.toml").write_text("[series]\nversion = 1\n")
    man = scratch_postman(project)
    outbox = man.format(tmp_path / "out")
    assert [m.subject for m in outbox.mails] == [
        "[PATCH 0/2] demo: The cover",
        "[PATCH 1/2] demo: Change line 10",
        "[PATCH 2/2] demo: Change line 30",
    ]
    assert man._numbering(outbox) == MailCheck("subjects numbered [PATCH n/2]", True, "")


def test_a_subject_over_75_characters_warns_but_does_not_fail(project: Project, tmp_path: Path):
    summary = "demo: X" + "x" * 69  # 76 characters: over the firm limit, under the hard one
    (project.root / "templates" / "0002.j2").write_text(f"{summary}\n\nAnd line 30 too.\n")
    man = scratch_postman(project)
    outbox = man.format(tmp_path / "out")
    outbox.checks = [man._subject_lengths(outbox)]
    assert outbox.checks[0].ok and outbox.checks[0].warn and not outbox.failed
    assert outbox.checks[0].detail == f"{outbox.mails[2].path.name}: 76 characters"
    shown = Console(record=True, width=200)
    shown.print(report(outbox))
    assert "│ warn │ subjects at most 75 characters │ v2-0002-demo-" in shown.export_text()


def test_a_commit_amended_past_the_changelog_rules_fails_the_check(
    project: Project, tmp_path: Path
) -> None:
    man = scratch_postman(project)
    message = git(project.tree, "log", "-1", "--format=%B")
    edited = message.replace("And line 30 too.", "This patch changes line 30 too.")
    (project.root / "message").write_text(edited)
    git(project.tree, "commit", "-q", "--amend", "-F", str(project.root / "message"))
    outbox = man.format(tmp_path / "out")
    check = man._changelog_rules(outbox)
    template = project.root / "templates" / "0002.j2"
    assert not check.ok
    assert check.detail.startswith(
        f"{outbox.mails[2].path.name} ({template}): 'This patch changes line 30 too.' breaks "
        'the rule: no "this patch"'
    )
    assert man._changelog_rules(man.format(tmp_path / "again")) == check  # on disk, not cached


# checkpatch.pl's verdict on a patch whose Fixes: id the tree does not hold, and one more fault.
UNKNOWN_ID = "WARNING:UNKNOWN_COMMIT_ID: Unknown commit id '16f95f3b95ca', maybe rebased?"
TRAILING = "ERROR:TRAILING_WHITESPACE: trailing whitespace"


def fake_checkpatch(tree: Path, *problems: str) -> None:
    """A scripts/checkpatch.pl that reports `problems` for every patch, as the real one does."""
    errors, warnings = (sum(p.startswith(kind) for p in problems) for kind in ("ERROR", "WARN"))
    lines = [*problems, f"total: {errors} errors, {warnings} warnings, 0 checks, 7 lines checked"]
    (tree / "scripts").mkdir(exist_ok=True)
    (tree / "scripts" / "checkpatch.pl").write_text(
        "".join(f"print q({line}), qq(\\n);\n" for line in lines)
    )


def checkpatch_check(man: Postman, tmp_path: Path, name: str) -> MailCheck:
    outbox = man.format(tmp_path / name)
    return next(c for c in man.check(outbox, sending=False) if c.name == "checkpatch --strict")


def test_an_unknown_commit_id_only_warns_in_a_tree_without_history(
    project: Project, tmp_path: Path
) -> None:
    man = scratch_postman(project)  # the scratch base is a root commit, as the default tree's is
    fake_checkpatch(project.tree, UNKNOWN_ID)
    check = checkpatch_check(man, tmp_path, "alone")
    assert check.ok and check.warn
    assert "commit ids not verified, the tree has no history before the base" in check.detail
    fake_checkpatch(project.tree, UNKNOWN_ID, TRAILING)
    shutil.rmtree(project.tree / ".git" / "kseries" / "cache")  # the patches did not change
    check = checkpatch_check(man, tmp_path, "with-more")
    assert not check.ok and TRAILING in check.detail


def test_an_unknown_commit_id_fails_in_a_tree_with_history(
    project: Project, tmp_path: Path
) -> None:
    project.upstream_commit(SOURCE.replace("line 40", "line 40 upstream"))
    man = scratch_postman(project)  # fetched: the base now has a parent
    fake_checkpatch(project.tree, UNKNOWN_ID)
    check = checkpatch_check(man, tmp_path, "out")
    assert not check.ok and UNKNOWN_ID in check.detail


# --- `invoke send-series --out`: only its own files are ever deleted ---------------------------


def send_series(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    """`invoke send-series` on the scratch tree, from the project's root as a user stands (with
    no test report: tests/test_evidence.py covers the Testing section)."""
    return invoke(
        project, "send-series", "--tree", str(project.tree), "--untested", *args, cwd=project.root
    )


def contents(*roots: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("out", ["patches", "templates/mails", "configs"])
def test_out_inside_the_series_data_is_refused_and_nothing_changes(project: Project, out: str):
    scratch_postman(project)
    data = [project.root / name for name in ("patches", "templates", "configs")]
    before = contents(*data)
    kind = out.split("/")[0]
    one_error(
        send_series(project, "--out", out),
        f"--out {project.root / out} is inside the series' {kind} directory {project.root / kind}",
        "write the mails anywhere else",
    )
    assert contents(*data) == before


def test_out_that_is_someone_elses_directory_is_refused(project: Project, tmp_path: Path):
    scratch_postman(project)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work\n")
    one_error(
        send_series(project, "--out", str(mine)),
        f"--out {mine} is not empty and holds no send-series output",
        "name an empty or new directory; nothing in this one was touched",
    )
    assert contents(mine) == {mine / "thesis.tex": b"years of work\n"}


def test_out_of_another_series_is_refused(project: Project, tmp_path: Path):
    man = scratch_postman(project)
    out = man.format(tmp_path / "out").directory
    stamp = out / ".kseries-send.json"
    stamp.write_text(stamp.read_text().replace('"demo"', '"other"'))
    before = contents(out)
    one_error(
        send_series(project, "--out", str(out)),
        f"--out {out} holds the mails of another series, 'other'",
    )
    assert contents(out) == before


def test_out_that_is_a_file_or_unwritable_is_one_error_line(project: Project, tmp_path: Path):
    scratch_postman(project)
    (tmp_path / "notes").write_text("mine\n")
    one_error(
        send_series(project, "--out", str(tmp_path / "notes")),
        f"--out {tmp_path}/notes is a file, not a directory",
    )
    assert (tmp_path / "notes").read_text() == "mine\n"
    # sysfs refuses mkdir even to root, so this is unwritable whoever runs the tests
    one_error(
        send_series(project, "--out", "/sys/kseries-out"),
        "--out /sys/kseries-out cannot be made: Operation not permitted",
        "pass a writable directory",
    )


def test_rerun_into_an_earlier_output_deletes_only_what_it_wrote(project: Project, tmp_path: Path):
    out = tmp_path / "out"
    v2 = scratch_postman(project).format(out)
    (out / "review-notes.txt").write_text("keep me\n")
    (project.configs / "local.toml").write_text("[series]\nversion = 3\n")
    v3 = scratch_postman(project).format(out)
    assert not {m.path for m in v2.mails} & {m.path for m in v3.mails}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".kseries-send.json", "review-notes.txt", *(m.path.name for m in v3.mails)]
    )
    assert (out / "review-notes.txt").read_text() == "keep me\n"


# --- send-series refuses what it cannot send, before it writes anything -----------------------


def test_send_while_a_rebase_is_stopped_names_the_next_command(project: Project, tmp_path: Path):
    scratch_postman(project)
    project.upstream_commit(replace_line(SOURCE, 30, "line 30 rewritten upstream"))
    with pytest.raises(ConflictError):
        Rebase(project.worktree(), project.series(), log=lambda _: None).start(
            remote="kvm-x86", branch="next"
        )
    before = project.snapshot()
    one_error(
        send_series(project, "--out", str(tmp_path / "out")),
        f"{project.tree}: a kseries rebase is stopped on a conflict, so demo-v2 is not finished",
        "resolve it and run `invoke rebase --continue`, or undo the run with "
        "`invoke rebase --abort`",
    )
    assert project.snapshot() == before and not (tmp_path / "out").exists()


def test_send_without_a_terminal_or_yes_is_refused(project: Project, tmp_path: Path, smtp):
    inbox, port = smtp
    scratch_postman(project, f'to = ["kvm@vger.kernel.org"]\n{smtp_local(port)}')
    one_error(
        send_series(project, "--send", "--out", str(tmp_path / "out")),  # stdin: /dev/null
        "--send asks before sending, and there is no terminal to ask on",
        "run it in a terminal, or add --yes",
    )
    assert inbox.mails == [] and not (tmp_path / "out").exists()


def test_a_damaged_branch_record_is_one_error(project: Project, tmp_path: Path):
    scratch_postman(project)
    record = project.worktree().git_path("kseries/demo-v2.json")
    record.write_text(record.read_text()[:40])  # a write cut short
    with pytest.raises(json.JSONDecodeError) as cut:
        json.loads(record.read_text())
    one_error(
        send_series(project, "--out", str(tmp_path / "out")),
        f"{record}: damaged branch record (JSONDecodeError: {cut.value})",
        f"delete it (rm {record}) and run `invoke rebase` again",
    )
    assert not (tmp_path / "out").exists()


def test_a_force_pushed_base_still_sends_only_the_series(project: Project, tmp_path: Path):
    base = project.upstream_commit(SOURCE + "line 41\n")
    man = scratch_postman(project)  # the series on `base`
    upstream = project.root / "upstream-work"  # next is rewritten: `base` is dropped from it
    git(upstream, "reset", "-q", "--hard", "HEAD~1")
    (upstream / "file.c").write_text(SOURCE + "line 42\n")
    git(upstream, "commit", "-qam", "rewritten")
    git(upstream, "push", "-qf", "origin", "next")
    git(project.tree, "fetch", "-q", "kvm-x86", "+next:refs/remotes/kvm-x86/next")
    outbox = man.format(tmp_path / "out")
    assert outbox.base == base
    assert [m.subject for m in outbox.mails[1:]] == [
        "[PATCH v2 1/2] demo: Change line 10",
        "[PATCH v2 2/2] demo: Change line 30",
    ]
