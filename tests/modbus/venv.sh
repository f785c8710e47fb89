#!/usr/bin/env bash
# Makes (once) the Python environment the Modbus tests run their device in: pymodbus and
# pyserial from PyPI in a venv at DIR, with Debian's python3 and python3-venv. Safe to run
# from several tests at once (flock); a complete venv is reused. Prints the venv's python.
set -euo pipefail
dir="${1:?usage: venv.sh DIR}"
python=/usr/bin/python3
[ -x "$python" ] || python=python3
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9
if ! "$dir/bin/python" -c 'import pymodbus, serial' >/dev/null 2>&1; then
    rm -rf "$dir"
    "$python" -m venv "$dir" >&2
    "$dir/bin/pip" install --quiet --disable-pip-version-check \
        'pymodbus==3.16.1' 'pyserial==3.5' >&2
fi
echo "$dir/bin/python"
