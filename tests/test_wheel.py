"""The wheel is complete: built from this repository and installed into a
fresh virtual environment outside the checkout, `orgbilling serve` starts on
the embedded default (migrations found as package data) and answers a call."""

import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import grpc

from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from orgbilling.v1 import org_billing_service_pb2_grpc, types_pb2
from tests.server_process import ServerProcess
from tests.support import REPO, new_key

BUILD_TIMEOUT_S = 300


def run(*command, cwd: Path, env=None) -> str:
    finished = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
    assert finished.returncode == 0, f"{command} failed:\n{finished.stdout}\n{finished.stderr}"
    return finished.stdout


CHARGE_WITH_THE_CLIENT = """
import sys
from orgbilling.client import CreditClient
with CreditClient(sys.argv[1], token=sys.argv[2], insecure=True) as client:
    client.allocate_credits(org_id="acme", user_id="alice", limit_millicredits=5_000,
                            reset_period="RESET_PERIOD_NEVER")
    charge = client.deduct_credits(org_id="acme", user_id="alice", amount_millicredits=1_500,
                                   service_type="llm", service_name="wheel-test")
    print(charge.replayed, client.get_credit_pool(org_id="acme").response.pool.used_millicredits)
"""


def test_the_wheel_installed_elsewhere_serves_on_the_embedded_default(embedded_data_dir):
    with tempfile.TemporaryDirectory(prefix="orgbilling-wheel-") as scratch:
        scratch = Path(scratch)
        # From a copy without build/: setuptools would reuse files a
        # previous build left there, deleted ones included.
        source = scratch / "source"
        shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", ".orgbilling", "*.egg-info", "__pycache__", ".pytest_cache",
            ".hypothesis"))
        run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
            str(scratch / "dist"), str(source), cwd=scratch)
        wheel, = (scratch / "dist").glob("orgbilling-*.whl")
        venv.create(scratch / "venv", with_pip=True)
        python = scratch / "venv" / "bin" / "python"
        run(str(python), "-m", "pip", "install", "--quiet", str(wheel), cwd=scratch)

        # Nothing of the checkout is importable from there: one top-level package.
        listing = run(str(python), "-c", "import importlib.metadata as m;"
                      " print(m.distribution('orgbilling').read_text('top_level.txt'))", cwd=scratch)
        assert listing.split() == ["orgbilling"]
        run(str(python), "-c", "import orgbilling.server.app, orgbilling.v1.credit_service_pb2", cwd=scratch)

        server = ServerProcess("", data_dir=embedded_data_dir, cwd=scratch,
                               command=[str(scratch / "venv" / "bin" / "orgbilling"), "serve"])
        try:
            server.start(ready_timeout_s=60)
            token = (embedded_data_dir / "admin-key").read_text().strip()
            with grpc.insecure_channel(server.address) as channel:
                billing = org_billing_service_pb2_grpc.OrgBillingServiceStub(channel)
                created = billing.CreateSubscription(
                    billing_pb.CreateSubscriptionRequest(
                        org_id="acme", plan=types_pb2.PLAN_PLATFORM,
                        billing_cycle=types_pb2.BILLING_CYCLE_MONTHLY, idempotency_key=new_key()),
                    metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            assert created.subscription.org_id == "acme"
            # The client library is in the wheel too: a charge through it.
            charged = run(str(python), "-c", CHARGE_WITH_THE_CLIENT, server.address, token, cwd=scratch)
            assert charged.split() == ["False", "1500"]
        finally:
            assert server.stop(timeout_s=30) == 0, server.log()
