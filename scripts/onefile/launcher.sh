#!/bin/sh
# octomil-lite @VERSION@, one file: a self-extracting PyInstaller one-dir build (made by scripts/build-onefile).
# The first start unpacks it, checked against its sha256, into a private per-build cache directory; every start
# then execs the unpacked program directly (no re-extraction). OCTOMIL_LITE_CACHE_DIR overrides the cache base,
# which must allow exec (a noexec /tmp does not).
set -eu
build=@BUILD@
sha=@SHA256@
skip=@SKIP@
if [ -z "${HOME:-}" ]; then HOME=$(getent passwd "$(id -u)" | cut -d: -f6); fi
base=${OCTOMIL_LITE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/octomil-lite}
dir=$base/$build
if [ ! -f "$dir/.complete" ]; then
  umask 077
  mkdir -p "$base"
  if [ ! -O "$base" ]; then
    echo "octomil-lite: $base is not owned by you; set OCTOMIL_LITE_CACHE_DIR to a directory of yours" >&2
    exit 1
  fi
  got=$(tail -n +"$skip" "$0" | sha256sum | cut -d' ' -f1)
  if [ "$got" != "$sha" ]; then
    echo "octomil-lite: this file is damaged (payload sha256 $got, expected $sha)" >&2
    exit 1
  fi
  tmp=$(mktemp -d "$base/.unpack.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT INT TERM
  tail -n +"$skip" "$0" | tar -xzf - -C "$tmp"
  echo "$sha" > "$tmp/octomil-lite/.complete"
  # a concurrent first start may have won the race: then its copy (complete too) is used
  mv -T "$tmp/octomil-lite" "$dir" 2>/dev/null || [ -f "$dir/.complete" ]
  rm -rf "$tmp"
  trap - EXIT INT TERM
fi
if [ ! -O "$dir" ]; then
  echo "octomil-lite: $dir is not owned by you; refusing to run it" >&2
  exit 1
fi
exec "$dir/octomil-lite" "$@"
