"""Generates the Python code for protos/ into a folder, or checks it is fresh.

`python -m tools.gen_protos generated` rewrites generated/;
`python -m tools.gen_protos --check generated` fails if generated/ differs from
what would be written, so CI catches a proto edited without regenerating.
"""

import argparse
import filecmp
import pathlib
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate(out_dir: pathlib.Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    # protoc writes modules, not packages.
    for package in {out_dir / pathlib.Path(p).parent for p in protos}:
        while package != out_dir:
            (package / "__init__.py").touch()
            package = package.parent


def differences(left: pathlib.Path, right: pathlib.Path) -> list[str]:
    comparison = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found = [f"only in one: {name}" for name in comparison.left_only + comparison.right_only]
    found += [f"differs: {name}" for name in comparison.diff_files]
    for sub in comparison.common_dirs:
        found += differences(left / sub, right / sub)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if not args.check:
        generate(args.out_dir)
        return
    with tempfile.TemporaryDirectory() as fresh:
        generate(pathlib.Path(fresh))
        stale = differences(pathlib.Path(fresh), args.out_dir)
    if stale:
        sys.exit("generated/ is stale; run `make protos`:\n  " + "\n  ".join(stale))
    print("generated/ is fresh")


if __name__ == "__main__":
    main()
