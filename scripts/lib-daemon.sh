# Sourced by the stop scripts: stop_pidfile LOG_PREFIX PIDFILE COMM WAIT_TENTHS stops the
# daemon a start script recorded in PIDFILE, and only if that pid still is COMM (pids are
# reused): TERM, up to WAIT_TENTHS tenths of a second, then KILL. The pidfile goes either way.
stop_pidfile() {
    if [ ! -f "$2" ]; then
        echo "$1: no pidfile at $2; nothing to stop"
        return 0
    fi
    _pid=$(cat "$2")
    if [ "$(cat "/proc/$_pid/comm" 2>/dev/null)" = "$3" ]; then
        kill "$_pid"
        _i=0
        while kill -0 "$_pid" 2>/dev/null && [ "$_i" -lt "$4" ]; do _i=$((_i + 1)); sleep 0.1; done
        kill -0 "$_pid" 2>/dev/null && kill -9 "$_pid"
        echo "$1: stopped $3 pid $_pid"
    else
        echo "$1: pid $_pid is not $3; removing stale pidfile"
    fi
    rm -f "$2"
}
