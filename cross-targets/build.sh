#!/usr/bin/env bash
# Builds Ferry for a board with Debian's cross compilers (no Docker needed).
#
#   cross-targets/build.sh TARGET [PACKAGE] [PROFILE]
#   cross-targets/build.sh aarch64-unknown-linux-musl               # ferry-edge, profile small
#   cross-targets/build.sh armv7-unknown-linux-gnueabihf ferry-edge release
#
# TARGET is one of:
#   aarch64-unknown-linux-musl       static, 64-bit Pi 3/4/5 and arm64 gateways (recommended)
#   aarch64-unknown-linux-gnu        glibc, same boards
#   armv7-unknown-linux-musleabihf   static, 32-bit Pi OS and most armhf gateways
#   armv7-unknown-linux-gnueabihf    glibc (2.36, Debian 12 / Pi OS bookworm, or newer)
# (Pi Zero / Pi 1, ARMv6: arm-unknown-linux-musleabihf with cross, see cross-targets/README.md.)
#
# Installs what is missing (as root, or with sudo): the Debian cross compiler for the
# architecture and the rustup target. Where rustup cannot download the target's standard
# library, builds it from source (see below). Prints the binary's path, size and file type.
set -euo pipefail
cd "$(dirname "$0")/.."
# Where cargo puts what it builds (CARGO_TARGET_DIR, when set, as an absolute path).
target_dir=$(realpath -m "${CARGO_TARGET_DIR:-target}")
target=${1:?usage: cross-targets/build.sh TARGET [PACKAGE] [PROFILE]}
package=${2:-ferry-edge}
profile=${3:-small}

case "$target" in
  aarch64-*) gcc=aarch64-linux-gnu-gcc; deb=gcc-aarch64-linux-gnu; cflags="" ;;
  armv7-*) gcc=arm-linux-gnueabihf-gcc; deb=gcc-arm-linux-gnueabihf; cflags="-march=armv7-a -mfpu=vfpv3-d16 -mfloat-abi=hard" ;;
  arm-*)
    # Debian's armhf C libraries (glibc and musl alike) are built for ARMv7: linked into an
    # ARMv6 binary they stop it with SIGILL on a Pi Zero / Pi 1 (seen under
    # qemu-arm -cpu arm1176). cross's images have ARMv6 C libraries.
    echo "$target (ARMv6): build it with cross (cross-targets/Cross.toml); Debian's armhf C libraries are ARMv7" >&2
    exit 2 ;;
  *) echo "unknown target $target (see the list at the top of $0)" >&2; exit 2 ;;
esac

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if ! command -v "$gcc" >/dev/null 2>&1; then
  $sudo apt-get update -qq || true  # a mirror mid-sync fails one index; the install says if it matters
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$deb" >/dev/null
fi

# cargo and the cc crate read these: the linker for Rust, the compiler for the C and
# assembly parts (ring, mimalloc). For musl targets Rust brings its own C library and start
# files (self-contained); the GNU cross compiler only links.
env_target=$(echo "$target" | tr 'a-z-' 'A-Z_')
cc_target=$(echo "$target" | tr '-' '_')
linker=$gcc
rustflags=""
build_std=()
if ! rustup target list --installed | grep -qx "$target" && ! rustup target add "$target" 2>/dev/null; then
  # rustup has no prebuilt standard library for this target here (some mirrors carry only
  # the common targets): build it from source (rust-src) with the stable compiler's
  # unstable -Zbuild-std, and for musl take the C library from Debian's musl-dev for the
  # architecture, linked through Debian's cross gcc with musl's specs.
  echo "building the standard library for $target from source"
  rustup component add rust-src
  export RUSTC_BOOTSTRAP=1
  build_std=(-Zbuild-std=std,panic_abort)
  case "$target" in
    arm*-musleabihf)
      dpkg --print-foreign-architectures | grep -qx armhf || $sudo dpkg --add-architecture armhf
      if ! dpkg -s musl-dev:armhf >/dev/null 2>&1; then
        $sudo apt-get update -qq || true  # a mirror mid-sync fails one index; the install says if it matters
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq musl-dev:armhf >/dev/null
      fi
      shims=$target_dir/cross-shims/$target
      mkdir -p "$shims"
      printf '#!/bin/sh\nexec %s -specs /usr/lib/arm-linux-musleabihf/musl-gcc.specs "$@"\n' "$gcc" >"$shims/musl-gcc"
      chmod +x "$shims/musl-gcc"
      # std links -lunwind; libgcc has the unwinder (and the helpers C code calls).
      echo "INPUT(-lgcc_eh -lgcc)" >"$shims/libunwind.a"
      linker=$shims/musl-gcc
      rustflags="-C link-self-contained=no -L $shims"
      ;;
  esac
fi
export "CARGO_TARGET_${env_target}_LINKER=$linker"
[ -z "$rustflags" ] || export "CARGO_TARGET_${env_target}_RUSTFLAGS=$rustflags"
export "CC_${cc_target}=$linker"
export "AR_${cc_target}=${gcc%-gcc}-ar"
export "CFLAGS_${cc_target}=$cflags"

# The boards' ferry-edge leaves the OPC UA field source out (it adds about 4 MB to the
# binary); FERRY_EDGE_FEATURES=edge,field,opcua,mimalloc puts it in.
features=()
[ "$package" != ferry-edge ] ||
  features=(--no-default-features --features "${FERRY_EDGE_FEATURES:-edge,field,mimalloc}")
cargo build "${build_std[@]}" --profile "$profile" -p "$package" --bin "$package" --target "$target" "${features[@]}"
dir=$profile
[ "$profile" = dev ] && dir=debug
bin=$target_dir/$target/$dir/$package
echo "$bin: $(stat -c %s "$bin") bytes, $(file -b "$bin" | sed "s/, BuildID\[[^]]*\]=[0-9a-f]*//")"
