"""The ``mailrelay`` command: check a config, look at and steer the queue.

``mailrelay queue ...`` talks to the running instance over its control socket
(``<spool path>/control.sock``; with ``[server] workers > 1``, to every worker over the socket
in its spool shard, and merges the answers); when no instance runs, ``list``, ``show`` and
``summary`` read the filesystem spool (or the shared PostgreSQL queue) directly, as an
``IOfflineQueue``, and ``delete``/``hold``/``release`` edit it (``flush`` needs a running
instance; with the PostgreSQL queue it makes the message(s) due for the nodes running
elsewhere). ``mailrelay db upgrade`` creates or migrates the PostgreSQL queue's schema.
Exit status: 0 success, 1 failure (bad config, no such message, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Generator
from typing import Any, TypeAlias

import attrs
from twisted.internet import defer

from mailrelay import config as configmod
from mailrelay._log import plural
from mailrelay.control.sources import CLIError, open_queue
from mailrelay.errors import ConfigError, each_config_error

#: What an ``inlineCallbacks`` generator yields and is sent: Deferreds and their results.
Steps: TypeAlias = Generator[defer.Deferred[Any], Any, Any]

PAGE = 500


# -- check-config -----------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    return json.dumps(str(value), ensure_ascii=False)


def _toml_key(key: str) -> str:
    return (
        key
        if key.replace("_", "").replace("-", "").isalnum() and key.isascii()
        else json.dumps(key)
    )


def _section_lines(obj: Any, defaults: Any) -> list[str]:
    lines = []
    for field in attrs.fields(type(obj)):
        value = getattr(obj, field.name)
        if value is None:
            continue
        if defaults is not None and value == getattr(defaults, field.name):
            continue
        lines.append(f"{field.name} = {_toml_value(value)}")
    return lines


def render_config(cfg: configmod.Config, only_changed: bool = False) -> str:
    """The effective configuration as TOML (every value, or with ``only_changed`` those set apart
    from the defaults, like ``postconf -n``). Durations are in seconds, sizes in bytes."""
    out: list[str] = [f"# effective configuration of {cfg.source}"]
    # The defaults are what the loader makes of a file that sets nothing (routes are printed as
    # written): that covers the defaults computed at load time (the hostname) as well as the
    # declared ones.
    defaults = configmod.from_dict({}, cfg.source) if only_changed else None
    # Sections are the attrs-typed fields of Config; a plain field <section>_<key> (metrics_listen)
    # is a key of that section — so a section added to config.py shows up here by itself.
    loose: dict[str, list[str]] = {}
    for field in attrs.fields(type(cfg)):
        value = getattr(cfg, field.name)
        if field.name in ("source", "routes") or value is None:
            continue
        default = getattr(defaults, field.name) if defaults is not None else None
        if attrs.has(type(value)):
            lines = _section_lines(value, default)
            if lines:
                out += ["", f"[{field.name}]", *lines]
        elif defaults is not None and value == default:
            continue
        elif "_" in field.name:
            section, key = field.name.split("_", 1)
            loose.setdefault(section, []).append(f"{key} = {_toml_value(value)}")
    for section, lines in loose.items():
        out += ["", f"[{section}]", *lines]
    if cfg.routes == configmod.DEFAULT_ROUTES:
        out += [
            "",
            "# no [[routes]] in the file: every recipient is routed by its domain's MX records",
        ]
    for route in cfg.routes:
        out += ["", "[[routes]]", f"type = {_toml_value(route.type)}"]
        out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in route.options.items()]
        if route.binarymime:
            out.append("binarymime = true")
    return "\n".join(out) + "\n"


def print_config_error(error: ConfigError, err: Any) -> None:
    """One ``mailrelay: file: key: reason`` line per error (a ``ConfigErrors`` holds several)."""
    for one in each_config_error(error):
        print("mailrelay:", " ".join(str(one).split()), file=err)


def check_config(path: str, only_changed: bool = False, out: Any = None, err: Any = None) -> int:
    """Load and fully validate ``path`` (routers built, nothing started); print it or the error."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        from mailrelay.preflight import check_file

        # every error of the file, each on its line: values, what they name (endpoints, files,
        # the spool directory), the routes built as the relay builds them
        cfg = check_file(path)
    except ConfigError as e:
        print_config_error(e, err)
        return 1
    print(render_config(cfg, only_changed), end="", file=out)
    return 0


# -- queue: printing ---------------------------------------------------------------------------


def _when(epoch: float | None) -> str:
    return time.strftime("%a %b %d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


def print_list(infos: list[dict[str, Any]], out: Any) -> None:
    for m in infos:
        mark = "!" if m["held"] else ("*" if m["active"] else " ")
        size = m["size"] if m["size"] is not None else 0
        sender = m["sender"] or "MAILER-DAEMON"
        print(f"{m['queue_id']}{mark} {size:>9} {_when(m['arrival'])}  {sender}", file=out)
        for r in m["recipients"]:
            if r["state"] != "pending":
                continue
            if r["last_reply"]:
                print(f"{'':>50}({r['last_reply']})", file=out)
            print(f"{'':>50}{r['address']}", file=out)
        print(file=out)


def print_show(m: dict[str, Any], out: Any) -> None:
    env = m["envelope"]
    state = "held" if m["held"] else ("being delivered" if m["active"] else "queued")
    rows = [
        ("queue id", m["queue_id"]),
        ("state", state),
        ("arrival", _when(m["arrival"])),
        ("sender", f"<{m['sender']}>"),
        ("size", m["size"]),
        ("attempts", m["attempts"]),
        ("next attempt", _when(m["next_attempt"]) if not m["held"] else "-"),
        (
            "client",
            f"{env.get('client_name') or '-'} [{env.get('client_address') or '-'}]"
            f" helo={env.get('helo') or '-'}",
        ),
        ("protocol", env.get("protocol")),
    ]
    for key in ("body", "smtputf8", "ret", "envid", "auth"):
        if env.get(key):
            rows.append((key, env[key]))
    for k, v in rows:
        print(f"{k + ':':<14}{v}", file=out)
    print("recipients:", file=out)
    for r in m["recipients"]:
        extra = f" attempts={r['attempts']}" if r["attempts"] else ""
        extra += f" remote={r['remote']}" if r["remote"] else ""
        print(f"  <{r['address']}> {r['state']}{extra}", file=out)
        if r["last_reply"]:
            print(f"      {r['last_reply']}", file=out)
    print("headers:", file=out)
    for line in m["headers"].splitlines():
        print(f"  {line}", file=out)


def print_summary(s: dict[str, Any], out: Any) -> None:
    head = f"{'':>30} {'T':>6} " + " ".join(f"{b:>6}" for b in s["buckets"])
    print(head, file=out)
    rows = [("TOTAL", s["total"])] + [(d, c) for d, c in s["rows"]]
    for name, counts in rows:
        print(f"{name[-30:]:>30} {sum(counts):>6} " + " ".join(f"{c:>6}" for c in counts), file=out)
    if s["more_domains"]:
        print(f"{'':>30} (and {plural(s['more_domains'], 'more domain')})", file=out)
    print(f"{plural(s['messages'], 'message')}, {s['held']} held", file=out)


# -- queue: commands ---------------------------------------------------------------------------


@defer.inlineCallbacks
def _queue_command(backend: Any, args: argparse.Namespace, out: Any) -> Steps:
    cmd = args.queue_command
    if cmd == "list":
        after, total_size, count, every = None, 0, 0, []
        while True:
            infos, more = yield backend.list(after, PAGE)
            if args.json:
                every += infos
            else:
                print_list(infos, out)
            count += len(infos)
            total_size += sum(m["size"] or 0 for m in infos)
            if not more or not infos:
                break
            after = infos[-1]["queue_id"]
        if args.json:
            print(json.dumps(every, indent=1), file=out)
        elif count:
            print(
                f"-- {(total_size + 1023) // 1024} Kbytes in {plural(count, 'Request')}.", file=out
            )
        else:
            print("Mail queue is empty", file=out)
    elif cmd == "show":
        m = yield backend.show(args.queue_id)
        print(json.dumps(m, indent=1), file=out) if args.json else print_show(m, out)
    elif cmd == "summary":
        s = yield backend.summary()
        print(json.dumps(s, indent=1), file=out) if args.json else print_summary(s, out)
    elif cmd == "flush":
        n = yield backend.flush(args.queue_id)
        print(f"flushed {plural(n, 'message')}", file=out)
    else:
        yield backend.act(cmd, args.queue_id)
        print(f"{args.queue_id}: {cmd}d" if cmd != "hold" else f"{args.queue_id}: held", file=out)
    return 0


def run_queue(args: argparse.Namespace, out: Any = None, err: Any = None) -> int:
    from twisted.internet.task import react

    out = out or sys.stdout
    err = err or sys.stderr
    code: list[int] = []

    def go(reactor: Any) -> defer.Deferred[None]:
        d = defer.maybeDeferred(open_queue, reactor, args)
        d.addCallback(_queue_command, args, out)

        def failed(f: Any) -> None:
            from mailrelay.control.protocol import MessageHeld

            if f.check(MessageHeld):
                print(
                    f"mailrelay: {args.queue_id} is held: release it to have it attempted", file=err
                )
            elif f.check(KeyError):
                print(f"mailrelay: no such message: {getattr(args, 'queue_id', '')}", file=err)
            elif f.check(ConfigError):
                print_config_error(f.value, err)
            elif f.check(CLIError, OSError):
                print(f"mailrelay: {f.value}", file=err)
            else:
                print(f"mailrelay: {f.getErrorMessage()}", file=err)
            code.append(1)

        return d.addCallbacks(code.append, failed)

    try:
        react(go)
    except SystemExit:
        pass
    return code[0] if code else 1


# -- db ---------------------------------------------------------------------------------------


def db_upgrade(path: str, out: Any = None, err: Any = None) -> int:
    """Create or migrate the PostgreSQL queue schema of the config's ``[spool] dsn``."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        cfg = configmod.load(path)
        if cfg.spool.backend != "postgresql":
            raise CLIError(
                f"{path}: [spool] backend is {cfg.spool.backend!r}: there is no database to upgrade"
            )
        from mailrelay.queue.postgres import schema as pg_schema

        before, after = pg_schema.upgrade(cfg.spool.dsn or "")
    except ConfigError as e:
        print_config_error(e, err)
        return 1
    except Exception as e:  # connection, schema: one line, no traceback
        print(f"mailrelay: {e}", file=err)
        return 1
    if before == after:
        print(f"database schema already at version {after}", file=out)
    else:
        print(f"database schema upgraded from version {before} to {after}", file=out)
    return 0


# -- argument parsing --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailrelay", description="mailrelay: a mail transfer agent on Twisted"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser(
        "check-config", help="validate a config file and print the effective config"
    )
    check.add_argument("file")
    check.add_argument(
        "-n", "--changed", action="store_true", help="only values that differ from the defaults"
    )

    queue = sub.add_parser("queue", help="look at and steer the queue")
    qsub = queue.add_subparsers(dest="queue_command", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            "-c",
            default=os.environ.get("MAILRELAY_CONFIG", "mailrelay.toml"),
            help="the instance's config file (default: $MAILRELAY_CONFIG or ./mailrelay.toml)",
        )
        p.add_argument(
            "--socket", default=None, help="the control socket (default: <spool path>/control.sock)"
        )
        return p

    common(qsub.add_parser("list", help="every queued message (like mailq)")).add_argument(
        "--json", action="store_true"
    )
    show = common(qsub.add_parser("show", help="one message: envelope, recipients, headers"))
    show.add_argument("queue_id", type=str.upper)
    show.add_argument("--json", action="store_true")
    common(
        qsub.add_parser("summary", help="pending recipients by domain and age (like qshape)")
    ).add_argument("--json", action="store_true")
    common(qsub.add_parser("flush", help="attempt a message (or every message) now")).add_argument(
        "queue_id", nargs="?"
    )
    for name, text in (
        ("delete", "remove a message without delivering or bouncing it"),
        ("hold", "keep a message without attempting it"),
        ("release", "undo hold: attempt the message now"),
    ):
        common(qsub.add_parser(name, help=text)).add_argument("queue_id", type=str.upper)
    db = sub.add_parser("db", help="the shared PostgreSQL queue's schema")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    up = dbsub.add_parser(
        "upgrade", help="create or migrate the schema to this version of mailrelay"
    )
    up.add_argument(
        "--config",
        "-c",
        default=os.environ.get("MAILRELAY_CONFIG", "mailrelay.toml"),
        help="the config file naming [spool] dsn (default: $MAILRELAY_CONFIG or ./mailrelay.toml)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "check-config": lambda a: check_config(a.file, a.changed),
        "queue": run_queue,
        "db": lambda a: db_upgrade(a.config),
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
