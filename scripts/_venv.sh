# Sourced by scripts/credproxy and scripts/test: makes .venv and installs credproxy into it.
# Works on a fresh Debian machine that has only python3: Debian splits venv and pip out of
# python3, so when they are missing and we are root, python3-venv is installed with apt-get.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
venv="${CREDPROXY_VENV:-$here/.venv}"
extra="${CREDPROXY_EXTRA:-}"
python=${PYTHON:-python3}

if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "credproxy: installing python3-venv (Debian ships venv and pip separately)" >&2
        [ -n "${CREDPROXY_APT_UPDATED:-}" ] || apt-get update -qq >/dev/null  # once per run
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
        echo "credproxy: python3 lacks venv/ensurepip; install python3-venv (apt-get install python3-venv)" >&2
        exit 1
    fi
fi

stamp="$venv/.credproxy-installed$extra"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# Reinstall when the project metadata changed since the last install into this venv.
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$here$extra"
    touch "$stamp"
fi
