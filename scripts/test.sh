#!/usr/bin/env bash
# Quick start 2 (and what CI runs): lint, type-check and test, with a local Redis.
# Starts redis-server on 127.0.0.1:6379 and RabbitMQ on 127.0.0.1:5672 if nothing answers
# there (the Redis and RabbitMQ tests use the real servers).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

section() { printf '\n\033[1m==== %s ====\033[0m\n' "$*"; }
die() { printf '\nerror: %s\n' "$*" >&2; exit 1; }

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [[ -n "$candidate" ]] || continue
        if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

redis_up() {
    if command -v redis-cli >/dev/null 2>&1; then
        [[ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" == "PONG" ]]
    else  # no client installed: speak the protocol over bash's /dev/tcp
        local reply
        { exec 3<>/dev/tcp/127.0.0.1/6379; } 2>/dev/null || return 1
        printf 'PING\r\n' >&3
        read -r -t 2 reply <&3 || true
        exec 3>&-
        [[ "$reply" == "+PONG"* ]]
    fi
}

section "Python environment (.venv)"
if [[ ! -x .venv/bin/python ]]; then
    py=$(find_python) || die "celeriac needs Python >= 3.11; set PYTHON=/path/to/python3.11"
    "$py" -m venv .venv || die "'$py -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi
python_ok .venv/bin/python || die ".venv has Python < 3.11; remove .venv and run again"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
.venv/bin/python --version

section "Redis on 127.0.0.1:6379"
if redis_up; then
    echo "already running"
else
    command -v redis-server >/dev/null 2>&1 \
        || die "Redis is not running on 127.0.0.1:6379 and redis-server is not installed"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
        --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
    for _ in $(seq 1 100); do
        redis_up && break
        sleep 0.1
    done
    redis_up || die "redis-server did not answer within 10 s (see /var/log/redis/ci.log)"
    echo "started"
fi

rabbit_up() {
    { exec 4<>/dev/tcp/127.0.0.1/5672; } 2>/dev/null || return 1
    printf 'AMQP\x00\x00\x09\x01' >&4
    local reply=""
    read -r -t 3 -n 4 reply <&4 || true
    exec 4>&-
    [[ "$reply" == "AMQP"* || -n "$reply" ]]
}

section "RabbitMQ on 127.0.0.1:5672"
if rabbit_up; then
    echo "already running"
else
    command -v rabbitmq-server >/dev/null 2>&1 \
        || die "RabbitMQ is not running on 127.0.0.1:5672 and rabbitmq-server is not installed"
    rabbitmq-server -detached
    for _ in $(seq 1 120); do
        rabbit_up && break
        sleep 0.5
    done
    rabbit_up || die "RabbitMQ did not answer within 60 s"
    echo "started"
fi

# The three checks all run, so one report shows every problem; any failure fails the script.
failed=()

section "ruff check"
lint_paths=()
for path in celeriac tests bench; do
    [[ -d "$path" ]] && lint_paths+=("$path")
done
.venv/bin/ruff check "${lint_paths[@]}" || failed+=("ruff")

section "mypy (strict, celeriac/)"
.venv/bin/mypy || failed+=("mypy")

section "pytest"
status=0
.venv/bin/pytest -q || status=$?
if [[ $status -eq 5 ]]; then
    echo "pytest collected no tests" >&2
    failed+=("pytest (no tests)")
elif [[ $status -ne 0 ]]; then
    failed+=("pytest (exit $status)")
fi

section "Summary"
if [[ ${#failed[@]} -gt 0 ]]; then
    printf 'FAILED: %s\n' "${failed[*]}"
    exit 1
fi
echo "ruff, mypy and pytest passed"
