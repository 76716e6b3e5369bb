"""Recovering missed deliveries against the fake GitHub on loopback and a real PostgreSQL.

The fake's hooks really deliver: signed bodies POSTed over HTTP to the service (the Flask app
under a real werkzeug server) or, while it is down, to a port nobody listens on, which GitHub
logs as failed. `recover` then reads those logs and brings in what the journal lacks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from flowlens_ingest.cli.main import main
from flowlens_ingest.config import ConfigError, Settings
from flowlens_ingest.events.hooks import HookTarget, api_path, target_of
from flowlens_ingest.github.client import GitHubClient
from flowlens_ingest.github.recover import Mode, Recoverer, Report, hooks_to_read, retention
from flowlens_ingest.store.schema import pull_requests, webhook_deliveries, webhook_hooks

from .fake_github import FakeGitHub, app_private_key_pem, serve_fake_github
from .helpers import PAYLOADS, SECRET, database_of, rows, wait_for
from .serving import Webhook
from .stories import START, pull_request, repository, sha_for

REPO = repository(9_200_001, "octo/recover")
# Each test its own hook: a process records a hook once (ingest.HOOKS), and each test empties the tables.
HOOK_IDS = itertools.count(4242)


def opened(number: int) -> dict[str, Any]:
    return pull_request("opened", REPO, number, sha_for("recover", number), START + timedelta(seconds=number))


@pytest.fixture
def github() -> Iterator[FakeGitHub]:
    with serve_fake_github() as fake:
        yield fake


def settings_for(github: FakeGitHub, *, app: bool = False, token: bool = True, **extra: Any) -> Settings:
    return Settings(
        github_api_url=github.url,
        github_token=github.token if token else None,
        github_app_id=str(github.app_id) if app else None,
        github_app_private_key=app_private_key_pem() if app else None,
        **extra,
    )


def run(db: Engine, github: FakeGitHub, mode: Mode = "redeliver", **options: Any) -> Report:
    """One recovery pass over the last 72 h with the settings' hooks, paced fast for tests."""
    app = options.pop("app", False)
    settings = settings_for(github, app=app, token=options.pop("token", True), **options.pop("settings", {}))
    client = GitHubClient(
        api_url=github.url,
        token=settings.github_token,
        app_id=settings.github_app_id,
        private_key=settings.github_app_private_key,
    )
    database = database_of(db)
    hooks, _ = hooks_to_read(settings, database)
    since = datetime.now(UTC) - timedelta(hours=72)
    options.setdefault("pace_s", 0.01)
    options.setdefault("settle_s", 30)
    with client:
        report = Recoverer(settings, database, client, **options).run(lambda _hook: since, mode, hooks)
    github.hook_logs.wait_redeliveries()
    return report


def journal(db: Engine, hook_id: int) -> list[dict[str, Any]]:
    found = rows(db, webhook_deliveries, "delivery_id", "hook_id", "outcome", "body_from_api", "attempts")
    return [row for row in found if row["hook_id"] == hook_id]


def attempts_posted(github: FakeGitHub) -> int:
    return len(github.calls("POST", "/attempts"))


def missed_while_down(github: FakeGitHub, path: str, numbers: range) -> list[str]:
    """Deliveries GitHub logs as failed (nobody listening), the first of them failing three times."""
    guids = [github.hook_logs.deliver(path, "pull_request", opened(n)) for n in numbers]
    for _ in range(2):
        github.hook_logs.deliver(path, "pull_request", opened(numbers[0]), guid=guids[0])
    return guids


@pytest.fixture
def hook(github: FakeGitHub, webhook: Webhook) -> tuple[str, int]:
    """A repository hook of the fake delivering to the service: its API path and id."""
    hook_id = next(HOOK_IDS)
    path = f"repos/octo/recover/hooks/{hook_id}"
    github.hook_logs.add_hook(path, hook_id, webhook.url, SECRET, target_type="repository", target_id=REPO["id"])
    return path, hook_id


def test_a_delivery_records_its_hook_from_the_target_headers(db, github, webhook, hook):
    path, hook_id = hook
    webhook.start()
    github.hook_logs.deliver(path, "pull_request", opened(1))
    assert rows(db, webhook_hooks, "hook_id", "target_type", "target_id", "api_path") == [
        {"hook_id": hook_id, "target_type": "repository", "target_id": REPO["id"], "api_path": path}
    ]
    assert [row["body_from_api"] for row in journal(db, hook_id)] == [False]


def test_recover_brings_in_every_missed_delivery_exactly_once_and_a_second_run_requests_nothing(
    db, github, webhook, hook
):
    path, hook_id = hook
    webhook.start()
    github.hook_logs.deliver(path, "pull_request", opened(1))
    webhook.stop()
    missed = missed_while_down(github, path, range(2, 8))
    # GitHub saw a 2xx, but the VM that answered was lost with its spool.
    lost = github.hook_logs.log_only(path, "pull_request", opened(8), status_code=202)
    webhook.start()

    report = run(db, github)

    assert sorted(m.guid for m in report.recovered) == sorted([*missed, lost]), report
    assert report.failed == [] and report.complete
    assert attempts_posted(github) == 7
    entries = journal(db, hook_id)
    assert len(entries) == 8 and {e["outcome"] for e in entries} == {"applied"}
    assert all(e["attempts"] == 1 and not e["body_from_api"] for e in entries)
    numbers = sorted(r["pr_number"] for r in rows(db, pull_requests, "pr_number"))
    assert numbers == list(range(1, 9))

    again = run(db, github)
    assert again.missing == [] and again.complete
    assert attempts_posted(github) == 7


def test_dry_run_lists_the_missing_guids_and_changes_nothing(db, github, webhook, hook, capsys, monkeypatch):
    path, hook_id = hook
    webhook.start()
    github.hook_logs.deliver(path, "pull_request", opened(1))
    webhook.stop()
    missed = missed_while_down(github, path, range(2, 4))
    monkeypatch.setenv("DATABASE_URL", str(db.url.render_as_string(hide_password=False)))
    monkeypatch.setenv("GITHUB_API_URL", github.url)
    monkeypatch.setenv("GITHUB_TOKEN", github.token or "")

    assert main(["recover", "--dry-run"]) == 1

    out = capsys.readouterr().out
    assert all(guid in out for guid in missed)
    assert "2 missing" in out.splitlines()[-1]
    assert attempts_posted(github) == 0
    assert len(journal(db, hook_id)) == 1


def test_recover_by_hand_goes_round_the_hooks_never_read(db, github, monkeypatch, capsys):
    # Twenty-five recorded hooks GitHub never answered for (invented by replayed headers): a run reads
    # twenty; the next run, the five it left first.
    invented = [f"repos/octo/recover/hooks/{70_000 + n}" for n in range(25)]
    with db.begin() as conn:
        for n, path in enumerate(invented):
            conn.execute(
                sa.insert(webhook_hooks).values(
                    hook_id=70_000 + n,
                    target_type="repository",
                    target_id=1,
                    api_path=path,
                    updated_at=sa.func.now() - timedelta(minutes=60 - n),
                )
            )
    monkeypatch.setenv("DATABASE_URL", str(db.url.render_as_string(hide_password=False)))
    monkeypatch.setenv("GITHUB_API_URL", github.url)
    monkeypatch.setenv("GITHUB_TOKEN", github.token or "")

    def asked() -> list[str]:
        paths = [c.path.split("/deliveries")[0].removeprefix("/") for c in github.calls("GET", contains="/hooks/")]
        github.requests.clear()
        return paths

    main(["recover", "--dry-run"])
    assert asked() == invented[:20]
    main(["recover", "--dry-run"])
    assert asked()[:5] == invented[20:]
    capsys.readouterr()


def test_a_guid_from_githubs_log_is_printed_escaped(db, github, webhook, hook, capsys, monkeypatch):
    # The log is GitHub's answer: what it holds reaches the operator's terminal only escaped.
    path, _hook_id = hook
    webhook.start()
    github.hook_logs.deliver(path, "pull_request", opened(1))
    webhook.stop()
    guid = github.hook_logs.deliver(path, "pull_request", opened(2), guid="guid-\x1b]0;owned\x07-\x7f")
    monkeypatch.setenv("DATABASE_URL", str(db.url.render_as_string(hide_password=False)))
    monkeypatch.setenv("GITHUB_API_URL", github.url)
    monkeypatch.setenv("GITHUB_TOKEN", github.token or "")

    assert main(["recover", "--dry-run"]) == 1

    captured = capsys.readouterr()
    assert "guid-\\x1b]0;owned\\x07-\\x7f" in captured.out
    for raw in ("\x1b", "\x07", "\x7f"):
        assert raw not in captured.out + captured.err
    assert guid == "guid-\x1b]0;owned\x07-\x7f"


def test_fetch_ingests_what_the_api_shows_when_github_cannot_reach_the_service(db, github, webhook, hook):
    path, hook_id = hook
    webhook.start()
    github.hook_logs.deliver(path, "pull_request", opened(1))
    webhook.stop()
    missed = missed_while_down(github, path, range(2, 5))

    report = run(db, github, "fetch")

    assert sorted(m.guid for m in report.recovered) == sorted(missed) and report.complete
    assert attempts_posted(github) == 0
    fetched = {e["delivery_id"]: e for e in journal(db, hook_id)}
    assert [fetched[guid]["body_from_api"] for guid in missed] == [True, True, True]
    assert {fetched[guid]["outcome"] for guid in missed} == {"applied"}
    assert sorted(r["pr_number"] for r in rows(db, pull_requests, "pr_number")) == [1, 2, 3, 4]
    assert run(db, github, "fetch").missing == []


def test_fetch_names_a_payload_no_delivery_may_carry_and_goes_on(db, github, webhook, hook):
    # Nested deeper than a delivery may be (GitHub's log shows it; the service refused it with a
    # 400): named as failed, not a traceback, and the next one is fetched.
    path, _hook_id = hook
    deep = opened(2)
    nested: Any = "leaf"
    for _ in range(80):
        nested = [nested]
    deep["pull_request"]["labels"] = nested
    webhook.start()
    github.hook_logs.deliver(path, "pull_request", opened(1))  # the hook is recorded
    webhook.stop()
    bad = github.hook_logs.deliver(path, "pull_request", deep)
    good = github.hook_logs.deliver(path, "pull_request", opened(3))

    report = run(db, github, "fetch")

    assert [name for name, _ in report.failed] == [m.name for m in report.missing if m.guid == bad]
    assert "no delivery may carry" in report.failed[0][1]
    assert [m.guid for m in report.recovered] == [good]


def test_the_app_webhook_is_read_with_the_apps_jwt(db, github, webhook):
    github.hook_logs.add_hook("app/hook", 777, webhook.url, SECRET, target_type="integration", target_id=github.app_id)
    missed = [github.hook_logs.deliver("app/hook", "pull_request", opened(n)) for n in (1, 2)]
    webhook.start()

    # No hook recorded yet: its id is learned from one delivery's headers; no token at all.
    report = run(db, github, app=True, token=False)

    assert sorted(m.guid for m in report.recovered) == sorted(missed) and report.complete
    assert {e["delivery_id"] for e in journal(db, 777)} == set(missed)
    assert rows(db, webhook_hooks, "hook_id", "api_path") == [{"hook_id": 777, "api_path": "app/hook"}]
    assert run(db, github, app=True, token=False).missing == []


def test_an_app_hook_id_named_only_by_headers_does_not_make_its_log_look_missing(db, github, webhook):
    github.hook_logs.add_hook("app/hook", 779, webhook.url, SECRET, target_type="integration", target_id=github.app_id)
    webhook.start()
    delivered = [github.hook_logs.deliver("app/hook", "pull_request", opened(n)) for n in (1, 2)]
    assert {e["delivery_id"] for e in journal(db, 779)} == set(delivered)
    # A signed body replayed with forged hook headers (the signature covers the body only) records
    # another "App hook", with a lower id.
    with db.begin() as conn:
        conn.execute(
            sa.insert(webhook_hooks).values(
                hook_id=5, target_type="integration", target_id=github.app_id, api_path="app/hook"
            )
        )
    report = run(db, github, app=True, token=False)
    # GitHub's id is used: nothing is missing, nothing redelivered (before: both, on every pass).
    assert report.missing == [] and attempts_posted(github) == 0


def test_configured_hooks_are_read_and_a_secondary_rate_limit_is_obeyed(db, github, webhook, hook):
    path, hook_id = hook
    missed = missed_while_down(github, path, range(1, 4))
    webhook.start()
    github.hook_logs.min_post_interval = 0.5

    # Nothing recorded: the hook is known from GITHUB_WEBHOOKS only.
    report = run(db, github, settings={"github_webhooks": (path,)})

    assert github.hook_logs.rate_limited_posts >= 1
    assert sorted(m.guid for m in report.recovered) == sorted(missed) and report.complete
    assert len(journal(db, hook_id)) == 3


def test_a_redelivery_that_never_arrives_is_named_and_the_run_fails(db, github, webhook, hook):
    path, hook_id = hook
    missed = missed_while_down(github, path, range(1, 2))

    report = run(db, github, settle_s=0.5, settings={"github_webhooks": (path,)})

    assert not report.complete
    assert [name for name, _ in report.failed] == [f"{missed[0]} (hook {hook_id}, pull_request)"]
    # The redelivery GitHub attempted failed too: it is logged, and the next run asks again.
    wait_for(lambda: len(github.hook_logs.hooks[path].log) == 4, "the failed redelivery in the log")
    assert [m.guid for m in run(db, github, "dry_run", settings={"github_webhooks": (path,)}).missing] == missed


def test_recover_without_a_credential_or_a_hook_exits_2(db, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", str(db.url.render_as_string(hide_password=False)))
    for name in ("GITHUB_TOKEN", "GITHUB_APP_ID", "GITHUB_APP_PRIVATE_KEY", "GITHUB_APP_PRIVATE_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["recover"]) == 2
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_x")
    assert main(["recover"]) == 2
    assert "GITHUB_WEBHOOKS" in capsys.readouterr().err
    assert main(["recover", "--dry-run", "--fetch"]) == 2


def test_recovery_settings_are_checked_at_start():
    assert Settings.from_env({}).recover_every_s == 600
    assert Settings.from_env({"FLOWLENS_RECOVER_EVERY": "0"}).recover_every_s == 0
    assert Settings.from_env({"FLOWLENS_RECOVER_EVERY": "1h"}).recover_every_s == 3600
    for bad in ("10", "5s", "2d", "soon", "-1m"):
        with pytest.raises(ConfigError, match="FLOWLENS_RECOVER_EVERY"):
            Settings.from_env({"FLOWLENS_RECOVER_EVERY": bad})
    hooks = "repos/acme/app/hooks/123, /orgs/acme/hooks/456/"
    assert Settings.from_env({"GITHUB_WEBHOOKS": hooks}).github_webhooks == (
        "repos/acme/app/hooks/123",
        "orgs/acme/hooks/456",
    )
    for bad in ("https://github.com/acme/app/settings/hooks/123", "repos/../x/hooks/1", "orgs/acme/hooks/x"):
        with pytest.raises(ConfigError, match="GITHUB_WEBHOOKS"):
            Settings.from_env({"GITHUB_WEBHOOKS": bad})
    assert retention("https://api.github.com") == timedelta(days=3)
    assert retention("https://ghe.example/api/v3") == timedelta(days=7)
    # GHE.com (data residency): GitHub Enterprise Cloud, 3 days like github.com.
    assert retention("https://api.octocorp.ghe.com") == timedelta(days=3)
    assert retention("https://API.Octocorp.GHE.com/") == timedelta(days=3)
    assert retention("https://octocorp.ghe.com.example/api/v3") == timedelta(days=7)


def test_the_journal_is_compared_by_guid_and_hook(db, github, webhook, hook):
    """A GUID another hook delivered is still missing for this one: GUIDs are shared by hooks."""
    path, _ = hook
    webhook.start()
    guid = github.hook_logs.deliver(path, "pull_request", opened(1))
    with db.begin() as conn:
        conn.execute(sa.update(webhook_deliveries).where(webhook_deliveries.c.delivery_id == guid).values(hook_id=99))
    report = run(db, github, "dry_run")
    assert [m.guid for m in report.missing] == [guid]


def test_a_hooks_api_path_comes_from_its_target_headers_and_the_payload():
    repo_payload = {"repository": {"full_name": "octo/app"}, "organization": {"login": "octo"}}
    assert api_path(11, target_of("repository", "42"), repo_payload) == "repos/octo/app/hooks/11"
    assert api_path(12, target_of("organization", "7"), repo_payload) == "orgs/octo/hooks/12"
    assert api_path(13, target_of("integration", "424242"), {}) == "app/hook"
    # No hook id, an unknown target, a payload that does not name the repository: nothing to record.
    assert api_path(0, target_of("integration", "1"), {}) is None
    assert api_path(14, target_of("business", "1"), repo_payload) is None
    assert api_path(15, target_of("repository", "42"), {"repository": {"full_name": "../x"}}) is None
    assert target_of("Repository\u00e9", "1") is None and target_of(None, None) is None
    assert target_of("repository", "x") == HookTarget("repository", None)


def test_the_recover_command_redelivers_and_a_second_run_finds_nothing_missing(
    db, github, webhook, hook, capsys, monkeypatch
):
    path, hook_id = hook
    webhook.start()
    github.hook_logs.deliver(path, "pull_request", opened(1))
    webhook.stop()
    missed = missed_while_down(github, path, range(2, 4))
    webhook.start()
    monkeypatch.setenv("DATABASE_URL", str(db.url.render_as_string(hide_password=False)))
    monkeypatch.setenv("GITHUB_API_URL", github.url)
    monkeypatch.setenv("GITHUB_TOKEN", github.token or "")

    assert main(["recover", "--since", "1h"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "recover: 1 hook read, 5 delivery attempts logged, 2 missing (2 redelivered, 0 not)"
    )
    assert {e["delivery_id"] for e in journal(db, hook_id)} >= set(missed)

    github.hook_logs.wait_redeliveries()
    assert main(["recover"]) == 0
    assert "0 missing" in capsys.readouterr().out
    assert attempts_posted(github) == 2


def test_a_fine_grained_token_reads_its_owners_hooks_and_a_refusal_names_the_permission(
    db, github, webhook, hook, capsys, monkeypatch
):
    path, hook_id = hook
    missed = missed_while_down(github, path, range(1, 3))
    other_repo, other_org = "repos/acme/app/hooks/5151", "orgs/acme/hooks/5252"
    for other in (other_repo, other_org):
        github.hook_logs.add_hook(
            other, int(other.rsplit("/", 1)[1]), webhook.url, SECRET, target_type="x", target_id=1
        )
        github.hook_logs.log_only(other, "pull_request", opened(9), status_code=0)
    github.hook_logs.token_owner = "octo"  # a fine-grained token whose resource owner is octo
    webhook.start()
    monkeypatch.setenv("DATABASE_URL", str(db.url.render_as_string(hide_password=False)))
    monkeypatch.setenv("GITHUB_API_URL", github.url)
    monkeypatch.setenv("GITHUB_TOKEN", github.token or "")
    monkeypatch.setenv("GITHUB_WEBHOOKS", ",".join((path, other_repo, other_org)))

    # octo's hook is read and recovered; acme's two are named with the permission each needs.
    assert main(["recover"]) == 1
    out, err = capsys.readouterr()
    assert {e["delivery_id"] for e in journal(db, hook_id)} == set(missed)
    assert f"cannot read {other_repo}: GitHub answered 404" in err
    assert "repository permission Webhooks (read and write) on acme/app" in err
    assert f"cannot read {other_org}: GitHub answered 404" in err
    assert "organization permission Webhooks (read and write) on acme" in err
    assert "is acme its resource owner? Hooks of several owners need the GitHub App" in err
    assert out.splitlines()[-1].startswith("recover: 1 hook read, 2 unreadable")

    # Its own owner's hook, without the Webhooks permission: 403, and the permission named.
    github.hook_logs.token_permissions = {"organization_hooks"}
    monkeypatch.setenv("GITHUB_WEBHOOKS", path)
    assert main(["recover", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert f"cannot read {path}: GitHub refused access (403): Resource not accessible by personal access token" in err
    assert "repository permission Webhooks (read and write) on octo/recover" in err


def test_recover_after_deliveries_without_hook_headers_says_why_there_is_no_hook(db, webhook, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", str(db.url.render_as_string(hide_password=False)))
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_x")
    monkeypatch.setenv("GITHUB_WEBHOOK_SECRET", SECRET)
    monkeypatch.delenv("GITHUB_WEBHOOKS", raising=False)
    assert main(["recover"]) == 2
    assert "no delivery from a GitHub hook has arrived yet" in capsys.readouterr().err
    webhook.start()

    # The README's first step: `send` signs and posts a sample, without GitHub's hook headers.
    sample = str(PAYLOADS / "pull_request" / "opened.payload.json")
    assert main(["send", sample, "--event", "pull_request", "--url", webhook.url]) == 0
    capsys.readouterr()

    assert main(["recover", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "deliveries arrived, but without GitHub's hook headers (X-GitHub-Hook-ID," in err
    assert "set GITHUB_WEBHOOKS to the hooks to read" in err and "or let GitHub deliver" in err
    assert "none has delivered yet" not in err
