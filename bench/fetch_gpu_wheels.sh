#!/usr/bin/env bash
# Downloads the wheels that the GPU machines' image lacks into .whl/ (or the folder given),
# for its Python 3.12 on x86-64 Linux; bench/gpu.sh installs them there.
#
#   bash bench/fetch_gpu_wheels.sh [DEST]
#
# The image has JAX with CUDA, flax, optax, orbax-checkpoint, scikit-learn, pillow, absl-py,
# numpy and most of their dependencies; these are the rest of setup.cfg's install_requires and
# of their Requires-Dist, at the versions the tests pass with on the development machine.
# protobuf is in the image too, but maybe older than grain (>= 5.28.3) and
# googleapis-common-protos (>= 6.33.5) need: the carried one shadows it.
# Ends by listing what the wheels need that is not among them: it must all be in the image
# (as must fsspec, zipp, einops and tqdm, which the etils extras that tensorflow-datasets asks
# for need: this check reads no extras).
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"

wheels=(
  ml-collections==1.1.0
  tensorflow-datasets==4.9.10
  grain==0.2.18
  tensorboardX==2.6.5
  # needed by those
  array-record==0.8.6
  dm-tree==0.1.10
  docstring-parser==0.18.0
  googleapis-common-protos==1.76.0
  immutabledict==4.3.1
  portpicker==1.6.0
  protobuf==7.36.2
  simple-parsing==0.1.9
  tensorflow-metadata==1.21.0
  termcolor==3.3.0
  toml==0.10.2
)
sdists=(promise==2.3) # pure Python with no wheel on PyPI: built here

mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$dest" "${wheels[@]}"
python3 -m pip wheel -q --no-deps -w "$dest" "${sdists[@]}"

python3 - "$dest" <<'EOF'
import email, pathlib, re, sys, zipfile

from packaging.requirements import Requirement

def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()

environment = {"python_version": "3.12", "sys_platform": "linux", "platform_system": "Linux",
               "extra": ""}
have, needs = set(), set()
for wheel in pathlib.Path(sys.argv[1]).glob("*.whl"):
    with zipfile.ZipFile(wheel) as z:
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        message = email.message_from_bytes(z.read(metadata))
    have.add(canonical(message["Name"]))
    for text in message.get_all("Requires-Dist") or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            needs.add(canonical(requirement.name))
print("needed from the image:", ", ".join(sorted(needs - have)))
EOF
du -ch "$dest"/*.whl | tail -1
