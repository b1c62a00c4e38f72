# Sourced by the setup scripts: need_pkgs PKG... installs the Debian packages that
# are missing, without letting their maintainer scripts start daemons (there is no
# systemd here, and e.g. docker-registry's default config would listen on every
# interface): policy-rc.d answers 101 ("not allowed") while apt runs.
need_pkgs() {
    _missing=""
    for _p in "$@"; do
        dpkg-query -W -f='${Status}' "$_p" 2>/dev/null | grep -q "ok installed" || _missing="$_missing $_p"
    done
    [ -z "$_missing" ] && return 0
    echo "apt-get install$_missing"
    _policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        _policy=1
    fi
    _rc=0
    DEBIAN_FRONTEND=noninteractive apt-get update -q && \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $_missing || _rc=$?
    [ -n "$_policy" ] && rm -f /usr/sbin/policy-rc.d
    return $_rc
}
