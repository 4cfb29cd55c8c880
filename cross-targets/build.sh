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
#   arm-unknown-linux-musleabihf     static, Pi Zero / Pi 1 (ARMv6)
#   arm-unknown-linux-gnueabihf      glibc, Pi Zero / Pi 1 (ARMv6; see cross-targets/README.md)
#
# Installs what is missing (as root, or with sudo): the Debian cross compiler for the
# architecture and the rustup target. Prints the binary's path, size and file type.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: cross-targets/build.sh TARGET [PACKAGE] [PROFILE]}
package=${2:-ferry-edge}
profile=${3:-small}

case "$target" in
  aarch64-*) gcc=aarch64-linux-gnu-gcc; deb=gcc-aarch64-linux-gnu; cflags="" ;;
  armv7-*) gcc=arm-linux-gnueabihf-gcc; deb=gcc-arm-linux-gnueabihf; cflags="-march=armv7-a -mfpu=vfpv3-d16 -mfloat-abi=hard" ;;
  arm-*) gcc=arm-linux-gnueabihf-gcc; deb=gcc-arm-linux-gnueabihf; cflags="-march=armv6 -mfpu=vfp -mfloat-abi=hard -marm" ;;
  *) echo "unknown target $target (see the list at the top of $0)" >&2; exit 2 ;;
esac

if ! command -v "$gcc" >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$deb" >/dev/null
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"

# cargo and the cc crate read these: the linker for Rust, the compiler for the C and
# assembly parts (ring, mimalloc). For musl targets Rust brings its own C library and start
# files (self-contained); the GNU cross compiler only links.
env_target=$(echo "$target" | tr 'a-z-' 'A-Z_')
cc_target=$(echo "$target" | tr '-' '_')
export "CARGO_TARGET_${env_target}_LINKER=$gcc"
export "CC_${cc_target}=$gcc"
export "AR_${cc_target}=${gcc%-gcc}-ar"
export "CFLAGS_${cc_target}=$cflags"

cargo build --profile "$profile" -p "$package" --bin "$package" --target "$target"
dir=$profile
[ "$profile" = dev ] && dir=debug
bin=target/$target/$dir/$package
echo "$bin: $(stat -c %s "$bin") bytes, $(file -b "$bin" | sed "s/, BuildID\[[^]]*\]//")"
