"""How `flowlens-ingest status` shows its report (status.py gathers it): a screen of a line or two a part, or JSON."""

from __future__ import annotations

import json
from typing import Any

from flowlens_ingest.cli.status import PARTS, Report, age, gather
from flowlens_ingest.config import Settings


def status(settings: Settings, *, json_output: bool, deadline_s: float) -> int:
    """Gather the report and print it; 0 when nothing needs action, 1 when something does."""
    report = gather(settings, deadline_s)
    print(as_json(report) if json_output else as_text(report), flush=True)
    return 1 if report.actions else 0


def as_json(report: Report) -> str:
    """The report as one JSON object: `ok`, `needs_action` and each part."""
    ordered = {name: report.parts[name] for name in PARTS if name in report.parts}
    return json.dumps({"ok": not report.actions, "needs_action": report.actions, **ordered})


def _recovery_line(recovery: dict[str, Any]) -> str:
    hooks = recovery["hooks"]
    if not hooks:
        return f"recovery    {recovery['note']}"
    checked = [when for when in hooks.values() if when is not None]
    oldest = f", every log checked through {min(checked)} or later" if len(checked) == len(hooks) else ""
    every = recovery["scheduled_every_s"]
    schedule = f"a pass every {age(every)}" if every else recovery.get("note", "")
    return f"recovery    {len(hooks)} hook log(s){oldest}; {schedule}"


def as_text(report: Report) -> str:
    """The report as a screen: a line or two per part, then what needs action."""
    parts = report.parts
    lines = [_database_line(parts.get("database", {}))]
    recent = parts.get("deliveries_last_hour")
    if recent is not None:
        shown = ", ".join(f"{n} {outcome}" for outcome, n in sorted(recent.items())) or "none"
        lines.append(f"deliveries  last hour: {shown}")
    failed = parts.get("failed")
    if failed is not None:
        since = f" (oldest {failed['oldest']})" if failed["count"] else ""
        lines.append(f"failed      {failed['count']} not replayed{since}")
    lines.append(_spool_line(parts["spool"]))
    files = parts.get("files")
    if files is not None:
        oldest = "" if files["oldest_pending_s"] is None else f", oldest {age(files['oldest_pending_s'])}"
        statuses = ", ".join(f"{n} {label}" for label, n in sorted(files["by_status"].items())) or "no jobs"
        lines.append(f"files       {files['pending']} pending{oldest} ({statuses})")
        if files["pending"] and not files["credential_here"]:
            lines.append(
                "            no GitHub credential here, so no files worker runs from this environment:"
                " set GITHUB_TOKEN (or the App), or run the worker where one is set"
            )
    rate = parts["github_rate_limit"]
    if rate["remaining"] is None:
        lines.append(f"github      rate limit {rate['note']}")
    else:
        lines.append(f"github      rate limit: {rate['remaining']:.0f} left (from {rate['source']})")
    recovery = parts.get("recovery")
    if recovery is not None:
        lines.append(_recovery_line(recovery))
    if report.actions:
        lines.append(f"NEEDS ACTION ({len(report.actions)}):")
        lines += [f"  - {action}" for action in report.actions]
    else:
        lines.append("OK: nothing needs action")
    return "\n".join(lines)


def _database_line(part: dict[str, Any]) -> str:
    where = part.get("where", "")
    if not part.get("reachable"):
        return f"database    UNREACHABLE ({part.get('error', 'unknown')}) {where}".rstrip()
    state = "migrations pending" if part["pending_migrations"] else "at head"
    revision = part["revision"] or "none (never migrated)"
    return f"database    reachable, revision {revision} ({state}; this release: {part['head']}), {where}"


def _spool_line(part: dict[str, Any]) -> str:
    if not part["enabled"]:
        return "spool       off (FLOWLENS_SPOOL_MAX_BYTES=0)"
    if "error" in part:
        return f"spool       UNREADABLE ({part['error']})"
    oldest = "" if part["oldest_s"] is None else f", oldest {age(part['oldest_s'])}"
    mib = 1 << 20
    return (
        f"spool       {part['depth']} waiting{oldest}, {part['set_aside']} set aside,"
        f" {part['bytes'] / mib:.1f} of {part['max_bytes'] // mib} MiB, room {part['room_bytes'] // mib} MiB"
    )
