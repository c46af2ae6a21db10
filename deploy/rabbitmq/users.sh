#!/bin/sh
# The compose broker's entrypoint: writes the passwords of the users rabbitmq.conf seeds (default_users.*) from the
# environment, then runs the given command (the image's docker-entrypoint.sh). Definitions files hold only password
# hashes, and a broker that loads them at boot creates no default user, so this is where passwords come in.
set -eu

users_conf="${RABBITMQ_USERS_CONF:-/etc/rabbitmq/conf.d/30-callflow-users.conf}"

# A rabbitmq.conf value is unquoted text that a '#' cuts short, so passwords keep to characters read the same there.
password() {
    eval "value=\${$1:-}"
    case "$value" in
        "")
            echo "$1 is not set: generate one with: openssl rand -hex 24" >&2
            exit 64
            ;;
        *[!A-Za-z0-9._~-]*)
            echo "$1 may hold only letters, digits and . _ ~ - (generate one with: openssl rand -hex 24)" >&2
            exit 64
            ;;
    esac
    if [ "${#value}" -lt 12 ]; then
        echo "$1 is shorter than 12 characters (generate one with: openssl rand -hex 24)" >&2
        exit 64
    fi
    printf '%s' "$value"
}

app_password="$(password RABBITMQ_APP_PASSWORD)"
admin_password="$(password RABBITMQ_ADMIN_PASSWORD)"
umask 077
{
    echo "default_users.callflow.password = $app_password"
    echo "default_users.callflow-admin.password = $admin_password"
} >"$users_conf"
# The image starts RabbitMQ as the rabbitmq user, which must read the file.
if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1; then
    chown rabbitmq:rabbitmq "$users_conf"
fi
exec "$@"
