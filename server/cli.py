"""The `orgbilling` command: serve, migrate, verify."""

import argparse
import sys

from server.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="orgbilling", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "migrate the database, then serve gRPC until SIGTERM"),
        ("migrate", "apply pending migrations and exit"),
        ("verify", "check the ledger's invariants for every organization"),
    ):
        Settings.add_arguments(commands.add_parser(name, help=help_text))
    arguments = parser.parse_args(argv)
    try:
        settings = Settings.load(arguments)
    except ValueError as error:
        parser.error(str(error))

    if arguments.command == "serve":
        from server.app import serve

        serve(settings)
    elif arguments.command == "migrate":
        from server.database import resolve_database_url
        from server.migrate import migrate

        applied = migrate(resolve_database_url(settings))
        print("applied: " + (", ".join(applied) or "nothing, already up to date"))
    elif arguments.command == "verify":
        from server.database import resolve_database_url
        from server.verify import violations

        found = violations(resolve_database_url(settings))
        for name, rows in found.items():
            print(f"VIOLATED: {name}: {len(rows)} rows, first: {rows[:5]}")
        print("all invariants hold" if not found else f"{len(found)} invariants violated")
        sys.exit(1 if found else 0)
