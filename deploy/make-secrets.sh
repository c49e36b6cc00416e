#!/bin/sh
# Make the site's passwords once (compose.yaml reads them from deploy/secrets/, mode 0600):
# the database's, a pgpass line for the hub, and the hub's own broker account's.
# Existing files are kept, so running it again changes nothing.
set -eu
dir="$(cd "$(dirname "$0")" && pwd)/secrets"
mkdir -p "$dir"
umask 077
random() { head -c 24 /dev/urandom | base64 | tr -d '/+=\n'; }
if [ ! -s "$dir/postgres_password" ]; then
    random > "$dir/postgres_password"
    echo "wrote $dir/postgres_password"
fi
if [ ! -s "$dir/pgpass" ]; then
    # host:port:database:user:password, as libpq reads PGPASSFILE
    printf 'postgres:5432:kdfleet:kdfleet:%s\n' "$(cat "$dir/postgres_password")" > "$dir/pgpass"
    echo "wrote $dir/pgpass"
fi
if [ ! -s "$dir/hub_mqtt_password" ]; then
    random > "$dir/hub_mqtt_password"
    echo "wrote $dir/hub_mqtt_password"
fi
if [ ! -s "$dir/s3_credentials" ]; then
    # the hub's account on the object store (the seaweedfs service, or any S3 store: put its keys here)
    printf '[default]\naws_access_key_id = kdfleet-hub\naws_secret_access_key = %s\n' "$(random)" > "$dir/s3_credentials"
    echo "wrote $dir/s3_credentials"
fi
if [ ! -s "$dir/seaweedfs_s3.json" ]; then
    # the seaweedfs service's identities: the hub's account above
    secret="$(sed -n 's/^aws_secret_access_key = //p' "$dir/s3_credentials")"
    printf '{"identities": [{"name": "kdfleet-hub", "credentials": [{"accessKey": "kdfleet-hub", "secretKey": "%s"}], "actions": ["Admin", "Read", "Write", "List"]}]}\n' "$secret" > "$dir/seaweedfs_s3.json"
    echo "wrote $dir/seaweedfs_s3.json"
fi
# the station's password arrives with deploy/add-device.sh; until then the file is empty
[ -e "$dir/agent_mqtt_password" ] || : > "$dir/agent_mqtt_password"
chmod 600 "$dir"/postgres_password "$dir"/pgpass "$dir"/hub_mqtt_password "$dir"/agent_mqtt_password \
    "$dir"/s3_credentials "$dir"/seaweedfs_s3.json
