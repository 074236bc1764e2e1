#!/usr/bin/env bash
# The system packages gesal-bot and its tests drive for real, installed with apt-get:
#   chromium + its driver  the playground's browser test and screenshot script
#   redis-server (TLS)     the rediss:// tests (the embedded server from PyPI has no TLS)
#   openssl                the TLS tests' throwaway certificate authority
#   g++                    torch.compile's CPU backend builds compiled updates with it
#   systemd-analyze        the check of deploy/systemd/gesal-bot.service
#   python3-venv           `python3 -m venv` on Debian's own Python
# `make run`, `make test` and CI all call this script; it does nothing when everything
# is present. Run as root it installs what is missing; otherwise it names the command.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

have() { command -v "$1" >/dev/null 2>&1; }

redis_has_tls() {
  have redis-server || return 1
  # a TLS build stops on the missing certificate; a build without TLS on the option itself
  local said
  said=$(timeout 20 redis-server --port 0 --tls-port 1 --save "" 2>&1 || true)
  [[ "$said" == *"No tls-cert-file"* ]]
}

missing=()
have chromium || have chromium-browser || missing+=(chromium)
have chromedriver || missing+=(chromium-driver)
redis_has_tls || missing+=(redis-server)
have openssl || missing+=(openssl)
have g++ || missing+=(g++)
have systemd-analyze || missing+=(systemd)
"$PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1 || missing+=(python3-venv)

if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "gesal-bot needs the system packages ${missing[*]}: run \`sudo $0\` once, then try again." >&2
  exit 1
fi
if ! have apt-get; then
  echo "gesal-bot needs the system packages ${missing[*]}, and this script installs them only with apt-get (Debian or Ubuntu): install them with your package manager, then try again." >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "installing system packages: ${missing[*]}"
apt-get update -qq
packages=()
for name in "${missing[@]}"; do
  case "$name" in
    chromium | chromium-driver)
      # Debian ships chromium and chromium-driver; Ubuntu names them chromium-browser and
      # chromium-chromedriver
      if apt-cache show "$name" >/dev/null 2>&1; then
        packages+=("$name")
      elif [ "$name" = chromium ]; then
        packages+=(chromium-browser)
      else
        packages+=(chromium-chromedriver)
      fi
      ;;
    *) packages+=("$name") ;;
  esac
done
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "installed: ${packages[*]}"
