# Sourced by scripts/test.sh and scripts/bench.sh: `apt_install NAME…`
# installs Debian packages (nothing when given none), with sudo unless root.
apt_install() {
  (($#)) || return 0
  echo "$(basename "$0"): installing $*"
  local sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "$@" >/dev/null
}
