#!/usr/bin/env bash
# The Raspberry Pi image, checked on this machine: builds deploy/Dockerfile for linux/arm64 under
# qemu-user-static + binfmt_misc (on a Debian base made by deploy/base_image.sh), runs the device
# runtime inside it on synthetic camera-trap images, and compares its answers with this machine's.
#   deploy/arm64_check.sh MODEL.ts [WORK]
# MODEL.ts: a location's pruned model from `geomoe device export` (README, "Deploy to Raspberry Pis").
# Needs root, Docker, debootstrap, qemu-user-static with binfmt_misc, Debian's mirror and PyPI.
# Slow: apt and pip run emulated in the first build (later builds reuse its layers).
# Prints JSON: same top species as x86, images the runtime classified, time and peak memory of one
# inference in a fresh process (emulated: a Pi 4/5 runs natively and faster; the memory includes qemu's).
set -euo pipefail
MODEL=$(realpath "$1")
WORK=${2:-/var/tmp/geomoe-arm64}
HERE=$(cd "$(dirname "$0")/.." && pwd)
GEOMOE=${GEOMOE:-$HERE/.venv/bin/geomoe}
IMAGE=geomoe:arm64
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  echo "no binfmt_misc handler for aarch64: apt-get install qemu-user-static binfmt-support" >&2
  exit 1
fi
rm -rf "$WORK/check" && mkdir -p "$WORK/check/images"
bash "$HERE/deploy/base_image.sh" geomoe-base:bookworm-arm64 arm64
start=$(date +%s)
docker build --network host --platform linux/arm64 -f "$HERE/deploy/Dockerfile" \
  --build-arg BASE=geomoe-base:bookworm-arm64 -t "$IMAGE" "$HERE" >"$WORK/build.log"
build_s=$(( $(date +%s) - start ))

# Synthetic camera-trap frames (PNG, as a camera writes them) and this machine's answers.
cp "$MODEL" "$WORK/check/model.ts"
"$(dirname "$GEOMOE")/python" - "$WORK/check/images" <<'PYEOF'
import sys
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for i in range(8):
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(f"{sys.argv[1]}/frame-{i:02d}.png")
PYEOF
cp -r "$WORK/check/images" "$WORK/check/x86-images"
"$GEOMOE" device run --once --settle-s 0 --watch "$WORK/check/x86-images" --model "$WORK/check/model.ts" \
  --results "$WORK/check/x86.jsonl" >/dev/null
chmod -R a+rwX "$WORK/check"  # the image runs as its own non-root user

cat > "$WORK/check/measure.py" <<'PYEOF'
import json, platform, resource, sys, time
import torch
from geomoe.client.export import load_torchscript
model, _ = load_torchscript("/check/model.ts")
image = torch.rand(1, 3, int(sys.argv[1]), int(sys.argv[1]))
with torch.no_grad():
    start = time.perf_counter()
    model(image)
    first = time.perf_counter() - start
    start = time.perf_counter()
    model(image)
    second = time.perf_counter() - start
print(json.dumps({"machine": platform.machine(), "torch": torch.__version__, "first_inference_s": round(first, 3),
                  "steady_inference_s": round(second, 3),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
PYEOF
docker run --rm --platform linux/arm64 --network none -v "$WORK/check:/check" --entrypoint geomoe "$IMAGE" \
  device run --once --settle-s 0 --watch /check/images --model /check/model.ts --results /check/arm64.jsonl >/dev/null
measured=$(docker run --rm --platform linux/arm64 --network none -v "$WORK/check:/check" \
  --entrypoint /opt/geomoe/bin/python "$IMAGE" /check/measure.py "${IMAGE_SIZE:-64}")

"$(dirname "$GEOMOE")/python" - "$WORK/check" "$measured" "$build_s" <<'PYEOF'
import json, sys
from pathlib import Path
folder, measured, build_s = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
def answers(name):
    rows = [json.loads(line) for line in (folder / name).read_text().splitlines()]
    return {Path(r["image"]).name: r for r in rows}
x86, arm = answers("x86.jsonl"), answers("arm64.jsonl")
top = lambda r: r["top"][0]["species"]
print(json.dumps({**measured, "images_classified": len(arm), "same_top_species": x86.keys() == arm.keys()
                  and all(top(x86[k]) == top(arm[k]) for k in x86), "build_s": build_s}))
PYEOF
