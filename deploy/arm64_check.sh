#!/usr/bin/env bash
# Runs an exported (TorchScript) model in a Debian bookworm arm64 root — the Raspberry Pi OS base —
# under qemu-user-static, and compares its predictions with this machine's.
#   deploy/arm64_check.sh MODEL.ts [WORKDIR]
# Needs root, debootstrap, qemu-user-static with binfmt_misc, and Debian's mirror and PyPI.
# Prints JSON: predictions equal or not, max logit difference, images/s under emulation.
set -euo pipefail
MODEL=$(realpath "$1")
WORK=${2:-/var/tmp/geomoe-arm64}
ROOT="$WORK/rootfs"
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
mkdir -p "$WORK"
if [ ! -x "$ROOT/usr/bin/python3" ]; then
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOT" \
    "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log"
fi
if [ ! -f "$ROOT/opt/venv/.torch-installed" ]; then
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
  # this machine's CA bundle, so pip in the root trusts the same registry proxy the host does
  cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$ROOT/etc/ssl/certs/host-ca.crt"
  [ -x "$ROOT/opt/venv/bin/python" ] || chroot "$ROOT" python3 -m venv /opt/venv
  # torch 2.9.1 is the aarch64 CPU build PyPI serves for Python 3.11 (what a Pi gets)
  chroot "$ROOT" env -i PATH=/usr/bin:/bin HOME=/root PIP_CERT=/etc/ssl/certs/host-ca.crt \
    /opt/venv/bin/pip install --quiet "torch==2.9.1" numpy >"$WORK/pip.log" 2>&1
  touch "$ROOT/opt/venv/.torch-installed"
fi
mkdir -p "$ROOT/check"
cp "$MODEL" "$ROOT/check/model.ts"
"$PY" - "$ROOT/check" <<'PYEOF'
import sys, torch
from pathlib import Path
folder = Path(sys.argv[1])
images = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
torch.save(images, folder / "images.pt")
torch.save(torch.jit.load(str(folder / "model.ts")).eval()(images).detach(), folder / "x86_logits.pt")
PYEOF
cat > "$ROOT/check/run.py" <<'PYEOF'
import json, platform, time, torch
images = torch.load("/check/images.pt")
model = torch.jit.load("/check/model.ts").eval()
with torch.no_grad():
    logits = model(images)
    start = time.perf_counter()
    for _ in range(3):
        model(images)
    rate = 3 * len(images) / (time.perf_counter() - start)
reference = torch.load("/check/x86_logits.pt")
print(json.dumps({"machine": platform.machine(), "torch": torch.__version__,
                  "same_predictions": bool((logits.argmax(1) == reference.argmax(1)).all()),
                  "max_logit_difference": float((logits - reference).abs().max()),
                  "images_per_s_emulated": round(rate, 2)}))
PYEOF
chroot "$ROOT" /opt/venv/bin/python /check/run.py
