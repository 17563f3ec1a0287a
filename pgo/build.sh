#!/usr/bin/env bash
# The release binary, built with profile-guided optimisation (PGO): an instrumented build serves a
# training load (pgo/train.js: small requests, streams, uploads, h2c, `token`), and the release
# build is made again with the profile it wrote. LLVM then lays the hot path out together and
# inlines by what is hot: the proxy runs about 27% fewer instructions per request and misses the
# instruction cache about a quarter as often (bench/experiments/README.md, "Session 9").
# This is the binary bench/run.sh measures and the one to package; `cargo build --release` gives
# the same program without the profile.
#
#   pgo/build.sh [OUT]        # OUT defaults to target/pgo/behest-agent
#
# Needs, besides the toolchain: node (the training load; Node.js's standard library only) and
# llvm-profdata from the toolchain's llvm-tools component, which this script adds with rustup when
# it is missing. Takes about two release builds' time. Knobs (environment): CARGO_TARGET_DIR
# (target), TRAIN_SECONDS (8).
set -euo pipefail
# OUT is taken relative to the directory the script is run from; the rest relative to the repository.
[[ -z ${1:-} || $1 == /* ]] || set -- "$PWD/$1"
cd "$(dirname "$0")/.."
TARGET_DIR=${CARGO_TARGET_DIR:-target}
OUT=${1:-$TARGET_DIR/pgo/behest-agent}
log() { printf '[pgo] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v node >/dev/null 2>&1 || die "node is needed for the training load (Debian: apt-get install nodejs)"
HOST=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata
if [[ ! -x $PROFDATA ]]; then
    log "adding the llvm-tools component (llvm-profdata)"
    rustup component add llvm-tools >&2 || die "could not add llvm-tools; run \`rustup component add llvm-tools\`"
fi
[[ -x $PROFDATA ]] || die "no llvm-profdata at $PROFDATA after adding llvm-tools"

WORK=$(mkdir -p "$TARGET_DIR/pgo" && cd "$TARGET_DIR/pgo" && pwd)
PROFILES=$WORK/profiles
rm -rf "$PROFILES" && mkdir -p "$PROFILES"
# --target: RUSTFLAGS then reach only the agent and its dependencies, not build scripts and
# proc-macros (which would write profiles of their own while compiling). Each stage has its own
# target directory, so neither rebuilds the other's artefacts, nor those of `cargo build --release`.
log "1/3 instrumented build"
RUSTFLAGS="-Cprofile-generate=$PROFILES" cargo build --release --quiet --locked --target "$HOST" \
    --target-dir "$WORK/instrumented"
log "2/3 training load"
node pgo/train.js --agent "$WORK/instrumented/$HOST/release/behest-agent" --seconds "${TRAIN_SECONDS:-8}"
compgen -G "$PROFILES/*.profraw" >/dev/null || die "the training run wrote no profile to $PROFILES"
"$PROFDATA" merge -o "$WORK/behest-agent.profdata" "$PROFILES"
log "3/3 optimised build"
RUSTFLAGS="-Cprofile-use=$WORK/behest-agent.profdata" cargo build --release --quiet --locked --target "$HOST" \
    --target-dir "$WORK/optimised"
mkdir -p "$(dirname "$OUT")"
cp "$WORK/optimised/$HOST/release/behest-agent" "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
log "done: $OUT"
