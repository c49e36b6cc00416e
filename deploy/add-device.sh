#!/bin/sh
# Give a station broker credentials:  deploy/add-device.sh SITE DEVICE [--new-password]
# Runs `kdfleet hub add-device` in the running hub container (it rewrites the password file
# and ACL in the mosquitto-auth volume), reloads the broker, and keeps the device's password
# in deploy/secrets/agent_mqtt_password for an agent on this host (compose profile cpu or
# jetson). For a station on another machine, copy the printed password there instead.
set -eu
[ $# -ge 2 ] || { echo "usage: $0 SITE DEVICE [--new-password]" >&2; exit 2; }
compose="${COMPOSE:-docker compose} -p ${COMPOSE_PROJECT_NAME:-kdfleet}"
dir="$(cd "$(dirname "$0")" && pwd)"
out=$($compose exec -T hub sh -c 'exec python -m hub add-device --config /etc/kdfleet/hub.toml \
    --db postgresql+psycopg://kdfleet@postgres/kdfleet \
    --broker "mqtts://kdfleet-hub:$(cat /run/secrets/hub_mqtt_password)@mosquitto:8884" "$@"' sh "$@")
echo "$out" | sed '/shown only now:/{n;d;}; /agent broker URL/d'
password=$(echo "$out" | sed -n '/shown only now:/{n;p;}')
[ -n "$password" ] || { echo "add-device printed no password; see above" >&2; exit 1; }
umask 077
printf '%s' "$password" > "$dir/secrets/agent_mqtt_password"
echo "the password is in $dir/secrets/agent_mqtt_password (username $2@$1)"
$compose kill -s SIGHUP mosquitto
