"""DATABASE_URL's forms: normalized to the one driver, a libpq host list read as SQLAlchemy's query
form, checked before anything connects, and named in messages without its user or password.

config.py reads DATABASE_URL with `database_url`; alembic's env.py, the benchmark and the tests
normalize theirs with `normalize_database_url`; messages name the server with `database_location`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from flowlens_ingest.environment import ConfigError

# The one driver the service is built and tested with.
DRIVER = "postgresql+psycopg2"


def normalize_database_url(url: str) -> str:
    """Accept libpq-style `postgres://` URLs and pin the psycopg2 driver; a libpq host list becomes query form.

    libpq (and psql) read `postgresql://u@h1:5432,h2:5433/db` as a list of hosts tried in
    turn; SQLAlchemy cannot parse it ("a port that is not a number"), but reads the same
    list from the query: `postgresql://u@/db?host=h1,h2&port=5432,5433`. So the first form
    is rewritten into the second, meaning exactly what libpq makes of it (a host without
    a port gets libpq's default, PGPORT or 5432). A list that cannot be rewritten
    safely raises ConfigError naming the query form to use.
    """
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg2://" + url[len(prefix) :]
            break
    return _host_list_as_query(url)


# scheme://[user[:password]@]hosts[/database][?query] as SQLAlchemy splits it (a password
# ends at the first `@`, a user at the first `:`); only `hosts` is looked at here.
_URL_PARTS = re.compile(
    r"(?P<head>[\w+]+://(?:[^:/@]*(?::[^@]*)?@)?)(?P<hosts>[^/?#]*)(?P<database>/[^?#]*)?(?P<query>\?[^#]*)?(?P<tail>#.*)?",
    re.DOTALL,
)
# One entry of a libpq host list: a name, an IPv4 address or a percent-encoded socket folder,
# or an IPv6 address in brackets; then an optional port.
_HOST_ENTRY = re.compile(r"(?:(?P<name>[A-Za-z0-9._~%-]+)|\[(?P<ipv6>[0-9A-Fa-f:.]+)\])(?::(?P<port>[^:]*))?")


def _host_list_as_query(url: str) -> str:
    """`…@h1:p1,h2:p2/db?q` as `…@/db?host=h1,h2&port=p1,p2&q`; any other URL unchanged."""
    parts = _URL_PARTS.fullmatch(url)
    if parts is None or "," not in parts["hosts"]:
        return url
    entries = [_HOST_ENTRY.fullmatch(entry) for entry in parts["hosts"].split(",")]
    hosts = [entry["name"] or entry["ipv6"] for entry in entries if entry]
    ports = [entry["port"] or "" for entry in entries if entry]
    valid = [port == "" or (port.isdigit() and 0 < int(port) < 65536) for port in ports]
    # The query form with the user's own hosts (as far as they could be read): what to write instead.
    example = "&".join(
        f"host={host}:{port if ok and port else 5432}" for host, port, ok in zip(hosts, ports, valid, strict=True)
    )
    advice = f"write the hosts in the query instead, like postgresql://USER@/DBNAME?{example}"
    if len(hosts) != len(entries):
        # Not echoed: what does not read as a host may be the end of a password holding a raw `@`.
        raise ConfigError(
            "DATABASE_URL has a host list that is not host:port,host:port,… (write the hosts in the query"
            " instead, like postgresql://USER@/DBNAME?host=HOST1:5432&host=HOST2:5432)"
        )
    if not all(valid):
        raise ConfigError(f"DATABASE_URL has a host list with a port that is not a number from 1 to 65535 ({advice})")
    query = (parts["query"] or "?")[1:]
    if any(field.split("=", 1)[0] in ("host", "hostaddr", "port") for field in query.split("&")):
        raise ConfigError(
            f"DATABASE_URL names hosts both before its database name and in its query: keep one list ({advice})"
        )
    # host=h1,h2&port=p1,p2 rather than host=h1:p1&host=h2:p2: SQLAlchemy reads the latter by
    # splitting at `:`, which an IPv6 address breaks; an empty port is libpq's default.
    listed = f"host={','.join(hosts)}" + (f"&port={','.join(ports)}" if any(ports) else "")
    return "".join(
        (parts["head"], parts["database"] or "/", "?", listed, "&" + query if query else "", parts["tail"] or "")
    )


def database_url(raw: str) -> str:
    """DATABASE_URL normalized and checked: a PostgreSQL URL psycopg2 can use, else ConfigError.

    The message never repeats the URL: it may hold a password.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    example = "like postgresql://user:password@host:5432/dbname"
    url = normalize_database_url(raw)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"DATABASE_URL is not a database URL ({example})") from None
    except ValueError:
        raise ConfigError(f"DATABASE_URL has a port that is not a number ({example})") from None
    if parsed.drivername != DRIVER:
        raise ConfigError(
            f"DATABASE_URL must be a postgres:// or postgresql:// URL, not {parsed.drivername}:// ({example})"
        )
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ConfigError(f"DATABASE_URL has a port outside 1-65535 ({example})")
    several = "like postgresql://user@/dbname?host=host1:5432&host=host2:5432&target_session_attrs=read-write"
    if "host" in parsed.query and parsed.host:
        # SQLAlchemy would silently connect to the query's hosts only.
        raise ConfigError(f"DATABASE_URL names a host both before its database name and in ?host= ({several})")
    try:
        # How the driver will be called: the hosts and ports must pair up, each port a number.
        keywords = parsed.get_dialect()().create_connect_args(parsed)[1]
    except ArgumentError:
        raise ConfigError(f"DATABASE_URL has ?host= and ?port= values that do not pair up ({several})") from None
    if any("\x00" in str(value) for value in keywords.values()):
        # libpq takes C strings: a NUL (%00) in a user, password or option cannot reach it.
        raise ConfigError(f"DATABASE_URL holds a NUL character (%00) ({example})")
    _check_connection_options(keywords)
    return url


# Options of YugabyteDB's psycopg2 fork (psycopg2-yugabytedb), which it takes out of the
# connection string before libpq sees it; plain libpq refuses each as an unknown option.
SMART_DRIVER_OPTIONS = frozenset(
    {
        "load_balance",
        "topology_keys",
        "yb_servers_refresh_interval",
        "fallback_to_topology_keys_only",
        "failed_host_reconnect_delay_secs",
    }
)


def _check_connection_options(keywords: Mapping[str, object]) -> None:
    """ConfigError for an option libpq does not know (a typo would fail every connection, after start)."""
    import importlib.metadata

    import psycopg2
    from psycopg2.extensions import make_dsn, parse_dsn

    smart = sorted(SMART_DRIVER_OPTIONS & keywords.keys())
    if smart and not any(
        "yugabyte" in name for name in importlib.metadata.packages_distributions().get("psycopg2", [])
    ):
        raise ConfigError(
            f"DATABASE_URL has {smart[0]}=, an option of YugabyteDB's psycopg2 fork, which is not installed"
            " (docs/deploying.md, Smart driver); with psycopg2-binary list the tservers with"
            " ?host=t1:5433&host=t2:5433&load_balance_hosts=random instead"
        )
    plain = {key: str(value) for key, value in keywords.items() if key not in SMART_DRIVER_OPTIONS}
    try:
        parse_dsn(make_dsn(**plain))
    except psycopg2.ProgrammingError as exc:
        # Only the option's name: libpq's message is about keys, but the string holds the password.
        named = re.search(r'option "([A-Za-z0-9_]{1,64})"', str(exc))
        option = f" ({named[1]})" if named else ""
        raise ConfigError(f"DATABASE_URL has a query option libpq does not know{option}") from None


def database_location(url: str) -> str:
    """`HOST:PORT/DATABASE`, or `H1:P1,H2:P2/DATABASE` for a host list: where, never who (no user, no password)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    args = parsed.get_dialect()().create_connect_args(parsed)[1]
    hosts = str(args.get("host") or "localhost").split(",")
    ports = str(args.get("port") or "").split(",")
    ports = ports if len(ports) == len(hosts) else ports[:1] * len(hosts)
    listed = ",".join(f"{host}:{port or 5432}" for host, port in zip(hosts, ports, strict=True))
    return f"{listed}/{parsed.database or ''}"
