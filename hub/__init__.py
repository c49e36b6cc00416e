"""The kdfleet hub: ingests inspection results from MQTT into SQL and serves the dashboard.

Layout: `ingest` (MQTT -> SQL), `db` (models, sessions, Alembic migrations),
`store` (content-addressed images on disk), `services` (every query the web
side and the CLI need, one module per concern), `web` (Flask app factory and
one blueprint per feature), `mosquitto` (the broker's password file and ACL
for provisioned devices), `cli`. docs/hub.md is the operator's guide.
"""
