"""`make run` stays easy with auth on: the embedded default makes a local
admin key on first start, saves it owner-only in the data directory, prints
a grpcurl command that works when pasted, and reuses the key later."""

import os
import stat
import subprocess
import sys
from pathlib import Path

from orgbilling.server.auth.api_keys import split_key
from tests.server_process import ServerProcess, environment_without_settings
from tests.support import REPO


def printed_command(server: ServerProcess) -> str:
    lines = server.log().splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("local admin key"))
    command = lines[index + 1].strip()
    assert command.startswith("grpcurl ") and "authorization: Bearer $(cat " in command, command
    return command


def run_in_shell(command: str) -> subprocess.CompletedProcess:
    environment = environment_without_settings({"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    return subprocess.run(["bash", "-c", command], cwd=REPO, env=environment, capture_output=True,
                          text=True, timeout=60)


def test_first_start_makes_a_private_admin_key_and_a_working_command(embedded_data_dir):
    tmp_path = embedded_data_dir
    key_file = tmp_path / "admin-key"

    first = ServerProcess("", data_dir=tmp_path).start(ready_timeout_s=60)
    try:
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert split_key(key) is not None
        assert key not in first.log()  # the command reads the file; the key is never printed
        first.client().funded_org("acme", 7_000, {})
        pasted = run_in_shell(printed_command(first))
        assert pasted.returncode == 0, pasted.stdout + pasted.stderr
        assert '"total_millicredits": "7000"' in pasted.stdout, pasted.stdout
    finally:
        assert first.stop() == 0, first.log()

    second = ServerProcess("", data_dir=tmp_path, port=first.port).start(ready_timeout_s=60)
    try:
        assert key_file.read_text().strip() == key  # reused, not replaced
        pasted = run_in_shell(printed_command(second))
        assert pasted.returncode == 0, pasted.stdout + pasted.stderr
    finally:
        assert second.stop() == 0, second.log()
