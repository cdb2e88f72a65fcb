"""`make run` stays easy: with the embedded default database the server makes
a local admin key (every scope, every organization) on first start, saves it
in the data directory, readable by its owner only, and reuses it on later
starts while it stays valid. A server with a configured database never does
this: there, keys are made with `orgbilling apikey create`."""

import logging
import os
import shlex
from pathlib import Path

from orgbilling.server.auth.api_keys import create_api_key, is_live_key, revoke
from orgbilling.server.auth.scopes import ALL_SCOPES

log = logging.getLogger(__name__)

ADMIN_KEY_FILE_NAME = "admin-key"
LOCAL_ADMIN_KEY_NAME = "local-admin"


def ensure_local_admin_key(database_url: str, data_dir: Path) -> Path:
    """The path of a file holding a live all-scopes key, made if needed."""
    path = data_dir / ADMIN_KEY_FILE_NAME
    if path.exists():
        if is_live_key(database_url, path.read_text().strip()):
            path.chmod(0o600)
            return path
        log.warning("the key in %s is no longer valid; making a new one", path)
    # A live key of that name whose secret we lost is useless: replace it.
    revoke(database_url, LOCAL_ADMIN_KEY_NAME)
    key = create_api_key(database_url, LOCAL_ADMIN_KEY_NAME, sorted(ALL_SCOPES))
    _write_private(path, key + "\n")
    log.info("made a local admin key, saved in %s", path)
    return path


def _write_private(path: Path, text: str) -> None:
    """Writes `text` to `path` with mode 0600 from the first byte, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def grpcurl_example(address: str, key_path: Path, tls_cert: str = "") -> str:
    """A grpcurl command that calls the server with the key in key_path,
    without printing the key itself."""
    transport = f"-cacert {shlex.quote(tls_cert)}" if tls_cert else "-plaintext"
    return (
        f"grpcurl {transport} -H \"authorization: Bearer $(cat {shlex.quote(str(key_path))})\" "
        f"-d '{{\"org_id\": \"acme\"}}' {address} orgbilling.v1.OrgBillingService/GetCreditPool"
    )
