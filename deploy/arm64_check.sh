#!/usr/bin/env bash
# The Raspberry Pi images, checked on this machine: builds one for linux/arm64 under qemu-user-static +
# binfmt_misc (on a Debian base made by deploy/base_image.sh), runs the device runtime inside it on
# synthetic camera-trap images, and compares its answers with this machine's.
#   deploy/arm64_check.sh MODEL.ts [WORK]     # the training image (deploy/Dockerfile), TorchScript
#   deploy/arm64_check.sh MODEL.onnx [WORK]   # the runtime-only image (deploy/Dockerfile.runtime), ONNX Runtime
# MODEL: a location's pruned model from `geomoe device export` (README, "Deploy to Raspberry Pis").
# Needs root, Docker, debootstrap, qemu-user-static with binfmt_misc, Debian's mirror and PyPI.
# Slow: apt and pip run emulated in the first build (later builds reuse its layers).
# Prints JSON: same top species as x86, images the runtime classified, time and peak memory of one
# inference in a fresh process (emulated: a Pi 4/5 runs natively and faster; the memory includes qemu's),
# and the image's size.
set -euo pipefail
MODEL=$(realpath "$1")
WORK=${2:-/var/tmp/geomoe-arm64}
HERE=$(cd "$(dirname "$0")/.." && pwd)
GEOMOE=${GEOMOE:-$HERE/.venv/bin/geomoe}
case "$MODEL" in
  *.onnx) IMAGE=geomoe-camera:arm64 DOCKERFILE=Dockerfile.runtime NAME=model.onnx ;;
  *) IMAGE=geomoe:arm64 DOCKERFILE=Dockerfile NAME=model.ts ;;
esac
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  echo "no binfmt_misc handler for aarch64: apt-get install qemu-user-static binfmt-support" >&2
  exit 1
fi
rm -rf "$WORK/check" && mkdir -p "$WORK/check/images"
bash "$HERE/deploy/base_image.sh" geomoe-base:bookworm-arm64 arm64
start=$(date +%s)
docker build --network host --platform linux/arm64 -f "$HERE/deploy/$DOCKERFILE" \
  --build-arg BASE=geomoe-base:bookworm-arm64 -t "$IMAGE" "$HERE" >"$WORK/build.log"
build_s=$(( $(date +%s) - start ))

# Synthetic camera-trap frames (PNG, as a camera writes them) and this machine's answers.
cp "$MODEL" "$WORK/check/$NAME"
"$(dirname "$GEOMOE")/python" - "$WORK/check/images" <<'PYEOF'
import sys
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for i in range(8):
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(f"{sys.argv[1]}/frame-{i:02d}.png")
PYEOF
cp -r "$WORK/check/images" "$WORK/check/x86-images"
"$GEOMOE" device run --once --settle-s 0 --watch "$WORK/check/x86-images" --model "$WORK/check/$NAME" \
  --results "$WORK/check/x86.jsonl" >/dev/null
chmod -R a+rwX "$WORK/check"  # the image runs as its own non-root user

# One inference in a fresh process, by the runtime the image carries (the runtime-only image has no torch).
cat > "$WORK/check/measure.py" <<'PYEOF'
import json, platform, resource, sys, time
from pathlib import Path
import numpy as np
from geomoe.camera.runtime import input_side
from geomoe.camera.inference import load_exported
model = load_exported(Path(sys.argv[1]))
side = input_side(model, None, Path(sys.argv[1]))  # the side the camera feeds it
image = np.random.default_rng(0).random((1, 3, side, side), dtype=np.float32)
start = time.perf_counter()
model.predict(image)
first = time.perf_counter() - start
start = time.perf_counter()
model.predict(image)
second = time.perf_counter() - start
print(json.dumps({"machine": platform.machine(), "runtime": model.runtime, "first_inference_s": round(first, 3),
                  "steady_inference_s": round(second, 3),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
PYEOF
run=(docker run --rm --platform linux/arm64 --network none -v "$WORK/check:/check" --entrypoint /opt/geomoe/bin/python)
"${run[@]}" "$IMAGE" -m geomoe.cli.device run --once --settle-s 0 --watch /check/images --model "/check/$NAME" \
  --results /check/arm64.jsonl >/dev/null
measured=$("${run[@]}" "$IMAGE" /check/measure.py "/check/$NAME")
size_mb=$(( $(docker image inspect --format '{{.Size}}' "$IMAGE") / 1000000 ))

"$(dirname "$GEOMOE")/python" - "$WORK/check" "$measured" "$build_s" "$size_mb" <<'PYEOF'
import json, sys
from pathlib import Path
folder, measured, build_s, size_mb = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def answers(name):
    rows = [json.loads(line) for line in (folder / name).read_text().splitlines()]
    return {Path(r["image"]).name: r for r in rows}
x86, arm = answers("x86.jsonl"), answers("arm64.jsonl")
top = lambda r: r["top"][0]["species"]
print(json.dumps({**measured, "images_classified": len(arm), "same_top_species": x86.keys() == arm.keys()
                  and all(top(x86[k]) == top(arm[k]) for k in x86), "build_s": build_s, "image_mb": size_mb}))
PYEOF
