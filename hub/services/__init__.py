"""The hub's query layer: every read and write the dashboard, the API and the CLI make.

Views call these functions and render what they return (plain frozen
dataclasses); they never build queries themselves, so a query is written once
and its indexes are chosen in one place. One module per concern:
`devices` (fleet, provisioning), `results` (lists, detail, live feed,
gallery), `reviews` (judgements and training data), `charts` (aggregates),
`users` (people and API tokens), `registry` (models and rollouts),
`retention` (pruning).
"""
