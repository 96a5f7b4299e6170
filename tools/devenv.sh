#!/usr/bin/env bash
# A developer's venv in seconds when the dependencies are already installed in a shared base venv:
#   KANO_BASE_VENV=/path/to/base tools/devenv.sh   -> .venv here, seeing the base's packages, Kano editable.
# Without KANO_BASE_VENV it is the README's install: python3 -m venv .venv && .venv/bin/pip install -e '.[test]'.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
if [ -n "${KANO_BASE_VENV:-}" ]; then
    site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    base=$("$KANO_BASE_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$base" > "$site/_kano_base_venv.pth"
    .venv/bin/pip install -q --no-deps -e .
else
    .venv/bin/pip install -q -e '.[test]'
fi
if [ -n "${KANO_BASE_VENV:-}" ]; then  # the base's console scripts the tests start (fakellm), where .venv has none
    for exe in "$KANO_BASE_VENV"/bin/*; do
        [ -e ".venv/bin/$(basename "$exe")" ] || ln -s "$exe" ".venv/bin/$(basename "$exe")"
    done
fi
