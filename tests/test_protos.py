"""The committed gRPC stubs are exactly what the .proto generates."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_match_the_proto(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "scripts/generate_protos.sh"), str(tmp_path)], check=True, env=env)
    for name in ("expert_pb2.py", "expert_pb2.pyi", "expert_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (ROOT / "protos" / name).read_text(), (
            f"{name} drifted: run scripts/generate_protos.sh"
        )


def test_stubs_import_inside_the_namespace():
    from geomoe.protos import expert_pb2, expert_pb2_grpc

    assert expert_pb2.ForwardRequest(layer=3).layer == 3
    assert hasattr(expert_pb2_grpc, "ExpertServiceStub")
