"""Regenerate the Python code of every .proto under protos/gpudeck into the gpudeck.proto package.

protoc writes modules named after the proto package (gpudeck.wallet.v1); we move them below
gpudeck.proto (gpudeck.proto.wallet.v1) so they never collide with the service packages, and
rewrite their imports to match. `--check` regenerates into a scratch folder and exits 1 when the
committed code differs (CI runs it).
"""

from __future__ import annotations

import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE
OUT = HERE / "src" / "gpudeck" / "proto"
IMPORT = re.compile(r"^(from|import) gpudeck\.(?!proto\.)", re.MULTILINE)


def generate(out: Path) -> None:
    sources = sorted(
        str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "gpudeck").rglob("*.proto")
    )
    include = str(Path(protoc.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as raw:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={raw}",
            f"--grpc_python_out={raw}",
            f"--mypy_out={raw}",
            f"--mypy_grpc_out={raw}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        generated = Path(raw) / "gpudeck"
        for path in sorted(generated.rglob("*")):
            if path.is_dir():
                continue
            target = out / path.relative_to(generated)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(IMPORT.sub(r"\1 gpudeck.proto.", path.read_text()))
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    (out / "py.typed").touch()


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files:
        return False
    # dircmp compares shallowly by stat; compare contents for certainty.
    for name in cmp.common_files:
        if (a / name).read_bytes() != (b / name).read_bytes():
            return False
    return all(same_tree(a / d, b / d) for d in cmp.common_dirs if d != "__pycache__")


def main() -> int:
    if "--check" in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as scratch:
            generate(Path(scratch))
            ignore = shutil.ignore_patterns("__pycache__")
            committed = Path(scratch + "-committed")
            shutil.copytree(OUT, committed, ignore=ignore)
            try:
                if not same_tree(Path(scratch), committed):
                    print("generated protobuf code is stale: run `make protos`", file=sys.stderr)
                    return 1
            finally:
                shutil.rmtree(committed)
        return 0
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    generate(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
