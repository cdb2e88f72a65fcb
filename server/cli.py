"""The `orgbilling` command: serve, migrate, verify, and apikey create/list/revoke."""

import argparse
import sys

from orgbilling.server.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="orgbilling", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "migrate the database (unless migrate_on_start is off), then serve gRPC until SIGTERM"),
        ("migrate", "apply pending migrations and exit"),
        ("verify", "check the ledger's invariants for every organization"),
    ):
        Settings.add_arguments(commands.add_parser(name, help=help_text))
    _add_apikey_commands(commands)
    arguments = parser.parse_args(argv)
    try:
        settings = Settings.load(arguments)
    except ValueError as error:
        parser.error(str(error))

    if arguments.command == "serve":
        from orgbilling.server.app import serve

        serve(settings)
    elif arguments.command == "migrate":
        from orgbilling.server.database import resolve_database_url
        from orgbilling.server.migrate import MigrationError, migrate

        try:
            applied = migrate(resolve_database_url(settings))
        except MigrationError as error:
            # A broken installation or database, not a bug: the message says it all.
            parser.exit(1, f"orgbilling migrate: error: {error}\n")
        print("applied: " + (", ".join(applied) or "nothing, already up to date"))
    elif arguments.command == "verify":
        from orgbilling.server.database import resolve_database_url
        from orgbilling.server.verify import violations

        found = violations(resolve_database_url(settings))
        for name, rows in found.items():
            print(f"VIOLATED: {name}: {len(rows)} rows, first: {rows[:5]}")
        print("all invariants hold" if not found else f"{len(found)} invariants violated")
        sys.exit(1 if found else 0)
    elif arguments.command == "apikey":
        try:
            _apikey(arguments, settings)
        except ValueError as error:
            parser.exit(2, f"orgbilling apikey: error: {error}\n")


def _add_apikey_commands(commands) -> None:
    apikey = commands.add_parser(
        "apikey", help="create, list and revoke API keys and certificate callers",
        description="Credentials of service callers, stored in the database (only a hash of "
                    "each secret): every replica sees a change within api_key_refresh_ms.",
    )
    actions = apikey.add_subparsers(dest="action", required=True)

    create = actions.add_parser(
        "create", help="create a key and print it once (the last line of the output)",
    )
    create.add_argument("--name", required=True, help="a unique name, such as chat-api")
    create.add_argument("--scopes", required=True,
                        help="comma separated: credits.read, credits.deduct, credits.manage, "
                             "credits.grant, billing.admin")
    create.add_argument("--org", dest="orgs", action="append", metavar="ORG",
                        help="limit the key to this organization (repeat for more); "
                             "without it, every organization")
    create.add_argument("--certificate-subject", metavar="SUBJECT",
                        help="instead of a secret, admit mutual-TLS callers whose client "
                             "certificate has this RFC 4514 subject, such as 'CN=worker,O=Acme'")
    Settings.add_arguments(create)

    listing = actions.add_parser("list", help="list live credentials (never their secrets)")
    listing.add_argument("--all", dest="include_revoked", action="store_true",
                         help="include revoked ones")
    Settings.add_arguments(listing)

    revoke = actions.add_parser("revoke", help="revoke the live credential with this name")
    revoke.add_argument("revoke_name", metavar="NAME")
    Settings.add_arguments(revoke)


def _apikey(arguments, settings: Settings) -> None:
    from orgbilling.server.auth import api_keys
    from orgbilling.server.database import resolve_database_url
    from orgbilling.server.migrate import migrate

    url = resolve_database_url(settings)
    # As `serve` does: the database may predate the api_keys table (migrating
    # is idempotent and safe under its lock).
    migrate(url)
    if arguments.action == "create":
        if arguments.certificate_subject:
            api_keys.create_certificate_caller(
                url, arguments.name, arguments.certificate_subject, arguments.scopes, arguments.orgs
            )
            print(f"certificate caller {arguments.name} created: client certificates with subject "
                  f"{arguments.certificate_subject} may now call")
            return
        key = api_keys.create_api_key(url, arguments.name, arguments.scopes, arguments.orgs)
        print(f"API key {arguments.name} created. It is shown only this once; callers send it as "
              f"the metadata 'authorization: Bearer <key>':", file=sys.stderr)
        print(key, flush=True)
    elif arguments.action == "list":
        print("name\tkind\tkey_id\tscopes\torgs\tcreated_at\trevoked_at\tcertificate_subject")
        for key in api_keys.list_keys(url, arguments.include_revoked):
            print("\t".join([
                key.name, key.kind, key.key_id, ",".join(key.scopes),
                "*" if key.org_ids is None else ",".join(key.org_ids),
                key.created_at.isoformat(timespec="seconds"),
                key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "-",
                key.certificate_subject or "-",
            ]))
    elif arguments.action == "revoke":
        if not api_keys.revoke(url, arguments.revoke_name):
            raise ValueError(f"no live credential is named {arguments.revoke_name!r}")
        print(f"revoked {arguments.revoke_name}: every server refuses it within "
              f"{settings.api_key_refresh_ms} ms")
