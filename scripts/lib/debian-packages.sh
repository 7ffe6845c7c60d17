# Sourced by the scripts that need Debian packages (scripts/test.sh,
# scripts/probe-bench.sh): installs the packages named as arguments, as root or
# through sudo, without letting their install scripts start services (nginx on :80,
# prometheus on :9090, blackbox_exporter on :9115): the tests and benches start their
# own instances on free loopback ports. Exits the calling script when apt-get fails.
install_debian_packages() {
  local sudo=()
  if [[ "$(id -u)" != 0 ]]; then sudo=(sudo); fi
  echo "==> installing Debian packages: $*"
  local policy_rc_d=/usr/sbin/policy-rc.d
  local added_policy=false
  if [[ ! -e "$policy_rc_d" ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy_rc_d" >/dev/null
    "${sudo[@]}" chmod 755 "$policy_rc_d"
    added_policy=true
  fi
  local status=0
  "${sudo[@]}" apt-get update -q || status=$?
  if ((status == 0)); then
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q --no-install-recommends "$@" || status=$?
  fi
  if $added_policy; then "${sudo[@]}" rm -f "$policy_rc_d"; fi
  if ((status != 0)); then
    echo "error: could not install $* (apt-get exited $status)" >&2
    exit "$status"
  fi
}
