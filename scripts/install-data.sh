#!/usr/bin/env bash
# Install the Debian packages holding graytune's real data sets (DESIGN.md §6), where apt-get exists.
set -euo pipefail
PACKAGES=(dataset-fashion-mnist wordnet-base fonts-noto-color-emoji fortunes tuxpaint-stamps-default)
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "data: installing ${missing[*]} with apt-get"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    cat >&2 <<MSG
data: these Debian packages are missing and this machine has no apt-get: ${missing[*]}
Install them on a Debian/Ubuntu machine (apt-get install ${missing[*]}), or copy each
package's files into a folder and set GRAYTUNE_DATA_<PACKAGE> to it, e.g.
GRAYTUNE_DATA_WORDNET_BASE=/path/to/wordnet-base (the README lists where each comes from).
MSG
    exit 1
fi
