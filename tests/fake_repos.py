"""The fake GitHub's repositories, as backfill reads them through the REST API.

`GET /repos/{o}/{r}` (the repository), `…/pulls` (GitHub's *simple* pull request: no `merged`,
`additions`, `changed_files`…; `state`, `sort=created`, pages by `page` in `Link`),
`…/pulls/{n}` (the full one; `refused` ones answer 404, 410 or 403 though the list shows them),
`…/pulls/{n}/reviews` (REST states upper case), `…/commits/{sha}/check-runs` (`{total_count, check_runs}`,
paged), `…/commits/{sha}/status` (combined: the latest status of each context, paged past
`per_page` contexts by `page` and `Link`, `total_count` the number of contexts) and `…/statuses` (every
one, newest first), `…/installation` and `/app/installations` (App JWT), `/installation/repositories`
(installation token, `{total_count, repositories}`). Faults of route `repos` (`fail_next`) apply,
and an exhausted primary budget (`remaining`) answers 403 until its reset.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from werkzeug.wrappers import Request, Response

if TYPE_CHECKING:
    from .fake_github import FakeGitHub

DOCS = "https://docs.github.com/rest"
_REPO = r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)"
_ROUTES = [
    ("repo", re.compile(_REPO + r"$")),
    ("pulls", re.compile(_REPO + r"/pulls$")),
    ("pull", re.compile(_REPO + r"/pulls/(?P<number>\d+)$")),
    ("reviews", re.compile(_REPO + r"/pulls/(?P<number>\d+)/reviews$")),
    ("check_runs", re.compile(_REPO + r"/commits/(?P<sha>[0-9a-f]{40})/check-runs$")),
    ("status", re.compile(_REPO + r"/commits/(?P<sha>[0-9a-f]{40})/status$")),
    ("statuses", re.compile(_REPO + r"/commits/(?P<sha>[0-9a-f]{40})/statuses$")),
    ("installation", re.compile(_REPO + r"/installation$")),
    ("installations", re.compile(r"^/app/installations$")),
    ("installation_repos", re.compile(r"^/installation/repositories$")),
]
# What the list endpoint leaves out of a pull request (GitHub's "simple" pull request).
SIMPLE_OMITS = ("merged", "mergeable", "mergeable_state", "merged_by", "comments", "review_comments")
SIMPLE_OMITS += ("maintainer_can_modify", "commits", "additions", "deletions", "changed_files", "rebaseable")


@dataclass
class RepoData:
    """One repository's state as the API serves it."""

    repo: dict[str, Any]
    installation_id: int | None = None
    pulls: dict[int, dict[str, Any]] = field(default_factory=dict)
    reviews: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    check_runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    statuses: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # Pull requests the list shows but whose GET answers this status (404 deleted or transferred, 403, 410).
    refused: dict[int, int] = field(default_factory=dict)
    # An odd day's paging: every page of the pulls list links `next` back to the first.
    next_is_first: bool = False


class Repositories:
    """Repositories served under the fake GitHub's API."""

    def __init__(self, fake: FakeGitHub) -> None:
        self.fake = fake
        self._lock = threading.Lock()
        self.repos: dict[str, RepoData] = {}

    def add(self, repo: dict[str, Any], installation_id: int | None = None) -> RepoData:
        """Serve `repo` (a repository object with `full_name`); its pulls, reviews, checks are set on the result."""
        data = RepoData(repo, installation_id)
        with self._lock:
            self.repos[repo["full_name"].lower()] = data
        return data

    def route(self, request: Request, path: str) -> Response | None:
        """Answer a repository request, or None when `path` is not one."""
        for name, pattern in _ROUTES:
            match = pattern.match(path)
            if match is not None and request.method == "GET":
                return self._answer(request, name, match.groupdict())
        return None

    def _answer(self, request: Request, name: str, args: dict[str, str]) -> Response:
        fault = self.fake._fault("repos")
        if fault is not None:
            return fault
        app_route = name in ("installation", "installations")
        _, _, value = request.headers.get("Authorization", "").partition(" ")
        allowed = self.fake._jwt_valid(value) if app_route else self.fake._authorized(request)
        if not allowed:
            return _json(401, {"message": "Bad credentials", "documentation_url": DOCS})
        with self.fake._lock:
            exhausted = self.fake.remaining <= 0 and not app_route
        if exhausted:
            return self.fake._primary_limited(str(int(self.fake.reset_at)))
        if name == "installations":
            ids = sorted({d.installation_id for d in self.repos.values() if d.installation_id is not None})
            return self._page(request, [{"id": i, "account": {"login": "octo"}} for i in ids])
        if name == "installation_repos":
            installation = self.fake._installation_tokens.get(value, (None, 0.0))[0]
            repos = [d.repo for d in self.repos.values() if d.installation_id == installation]
            return self._page(request, repos, wrap="repositories")
        data = self.repos.get(f"{args['owner']}/{args['repo']}".lower())
        if data is None:
            return _json(404, {"message": "Not Found", "documentation_url": DOCS})
        return self._repo_answer(request, name, args, data)

    def _repo_answer(self, request: Request, name: str, args: dict[str, str], data: RepoData) -> Response:
        if name == "repo":
            return self._ok(data.repo)
        if name == "installation":
            if data.installation_id is None:
                return _json(404, {"message": "Not Found", "documentation_url": DOCS})
            return _json(200, {"id": data.installation_id})
        if name == "pulls":
            state = request.args.get("state", "open")
            pulls = [p for _, p in sorted(data.pulls.items()) if state == "all" or p["state"] == state]
            simple = [{k: v for k, v in p.items() if k not in SIMPLE_OMITS} for p in pulls]
            answer = self._page(request, simple)
            if data.next_is_first:
                first = "&".join(f"{k}={v}" for k, v in request.args.items() if k != "page")
                answer.headers["Link"] = f'<{self.fake.url}{request.path}?{first}>; rel="next"'
            return answer
        if name == "pull":
            refused = data.refused.get(int(args["number"]))
            if refused is not None:
                message = "Resource not accessible by integration" if refused == 403 else "Not Found"
                return _json(
                    refused, {"message": message, "documentation_url": DOCS}, self.fake._rate_headers(spend=True)
                )
            pull = data.pulls.get(int(args["number"]))
            return self._ok(pull) if pull is not None else _json(404, {"message": "Not Found"})
        if name == "reviews":
            return self._page(request, data.reviews.get(int(args["number"]), []))
        if name == "check_runs":
            return self._page(request, data.check_runs.get(args["sha"], []), wrap="check_runs")
        statuses = sorted(data.statuses.get(args["sha"], []), key=lambda s: s["updated_at"], reverse=True)
        if name == "statuses":
            return self._page(request, statuses)
        latest: dict[str, dict[str, Any]] = {}
        for item in statuses:
            latest.setdefault(item["context"], item)
        # The combined object on every page; its `statuses` paged like a list, `total_count` all contexts.
        answer = self._page(request, list(latest.values()), wrap="statuses")
        combined = json.loads(answer.get_data())
        combined.update(state=_combined_state(list(latest.values())), sha=args["sha"])
        answer.set_data(json.dumps(combined))
        return answer

    def _ok(self, body: Any) -> Response:
        return _json(200, body, self.fake._rate_headers(spend=True))

    def _page(self, request: Request, items: list[Any], wrap: str | None = None) -> Response:
        per_page = min(100, max(1, int(request.args.get("per_page", "30"))))
        page = max(1, int(request.args.get("page", "1")))
        chunk = items[(page - 1) * per_page : page * per_page]
        headers = self.fake._rate_headers(spend=True)
        if page * per_page < len(items):
            query = "&".join(f"{k}={v}" for k, v in request.args.items() if k != "page")
            headers["Link"] = f'<{self.fake.url}{request.path}?{query}&page={page + 1}>; rel="next"'
        body: Any = {"total_count": len(items), wrap: chunk} if wrap else chunk
        return _json(200, body, headers)


def _combined_state(latest: list[dict[str, Any]]) -> str:
    """GitHub's combined `state`: failure if any context failed or errored, pending if none or one is pending, else success."""
    states = {item.get("state") for item in latest}
    if states & {"failure", "error"}:
        return "failure"
    return "pending" if not states or "pending" in states else "success"


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body), status=status, headers=headers or {}, content_type="application/json; charset=utf-8"
    )
