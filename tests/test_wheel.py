"""The wheel is complete: built from this repository and installed into a
fresh virtual environment outside the checkout, `orgbilling serve` starts on
the embedded default (migrations found as package data) and answers a call."""

import os
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import grpc

from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from orgbilling.v1 import org_billing_service_pb2_grpc, types_pb2
from tests.support import REPO, free_port, new_key, wait_serving

BUILD_TIMEOUT_S = 300


def run(*command, cwd: Path, env=None) -> str:
    finished = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
    assert finished.returncode == 0, f"{command} failed:\n{finished.stdout}\n{finished.stderr}"
    return finished.stdout


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

        address = f"127.0.0.1:{free_port()}"
        env = {key: value for key, value in os.environ.items() if not key.startswith("ORGBILLING_")}
        env |= {"ORGBILLING_LISTEN_ADDRESS": address, "ORGBILLING_DATA_DIR": str(embedded_data_dir)}
        log_path = scratch / "serve.log"
        with open(log_path, "wb") as log:
            server = subprocess.Popen([str(scratch / "venv" / "bin" / "orgbilling"), "serve"],
                                      cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_serving(address, 60, process=server, log_path=log_path)
            token = (embedded_data_dir / "admin-key").read_text().strip()
            with grpc.insecure_channel(address) as channel:
                billing = org_billing_service_pb2_grpc.OrgBillingServiceStub(channel)
                created = billing.CreateSubscription(
                    billing_pb.CreateSubscriptionRequest(
                        org_id="acme", plan=types_pb2.PLAN_PLATFORM,
                        billing_cycle=types_pb2.BILLING_CYCLE_MONTHLY, idempotency_key=new_key()),
                    metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            assert created.subscription.org_id == "acme"
        finally:
            server.terminate()
            assert server.wait(30) == 0, log_path.read_text()
