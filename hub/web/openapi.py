"""The OpenAPI 3 description of the JSON API, served at /api/openapi.json.

Written by hand next to the views it describes; a test checks that every
/api route is documented and every documented path exists. It is one document,
read and checked as a whole, so it stays one module however many routes
the API has.
"""

from __future__ import annotations

from typing import Any

from hub.db.models import ROLES, ROLLOUT_DRAFT, ROLLOUT_STATES
from hub.services.charts import WINDOWS
from hub.services.results import REVIEW_STATES, SORTS
from shared.vocabulary import METHODS, PRECISIONS, REVIEW_LABELS, VERDICTS

TIME = {"type": "string", "format": "date-time"}
MODEL_METRICS = {
    "type": "object",
    "description": "the package's measured metrics: image_auroc, pixel_auroc, aupro (means), classes "
                   "(image AUROC per class), latency_ms, size_mb, drop_vs_fp32 (for quantised packages)",
    "additionalProperties": True,
}
NULLABLE_TIME = {**TIME, "nullable": True}
URL = {"type": "string", "nullable": True, "description": "a path on this hub"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _path(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {
    "400": {"$ref": "#/components/responses/BadRequest"},
    "401": {"$ref": "#/components/responses/Unauthorized"},
}
NOT_FOUND = {"404": {"$ref": "#/components/responses/NotFound"}}
FORBIDDEN = {"403": {"$ref": "#/components/responses/Forbidden"}}

PAGE_PARAMS = [
    _query("before", "cursor from the previous answer's `next` URL"),
    _query("limit", "items per page, 1-500 (default 50)", {"type": "integer", "minimum": 1, "maximum": 500}),
]
RESULT_FILTERS = [
    _query("site", "site name"),
    _query("device", "device name"),
    _query("station", "station name"),
    _query("cls", "product class"),
    _query("verdict", "verdict", {"type": "string", "enum": list(VERDICTS)}),
    _query("review", "review state", {"type": "string", "enum": list(REVIEW_STATES)}),
    _query("since", "capture time from (inclusive), ISO 8601", TIME),
    _query("until", "capture time until (exclusive), ISO 8601", TIME),
    _query("sort", "newest first, or highest score first", {"type": "string", "enum": list(SORTS)}),
    *PAGE_PARAMS,
]
REVIEW_FILTERS = [
    _query("label", "review label", {"type": "string", "enum": list(REVIEW_LABELS)}),
    _query("cls", "product class"),
    _query("since", "reviewed at or after, ISO 8601", TIME),
    *PAGE_PARAMS,
]

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "properties": {
            "error": {"type": "string"},
            "detail": {"type": "string", "description": "what went wrong and what to do"},
            "status": {"type": "integer"},
        },
    },
    "Device": {
        "type": "object",
        "properties": {
            "site": {"type": "string"},
            "name": {"type": "string"},
            "station": {"type": "string"},
            "state": {"type": "string", "enum": ["online", "error", "silent", "offline"],
                      "description": "error: online, with a source failing (source_error says why)"},
            "online": {"type": "boolean"},
            "last_seen": NULLABLE_TIME,
            "model_id": {"type": "string"},
            "model_version": {"type": "string"},
            "runtime": {"type": "string"},
            "hardware": {"type": "string"},
            "agent_version": {"type": "string"},
            "fps": {"type": "number", "nullable": True},
            "latency_p50_ms": {"type": "number", "nullable": True},
            "latency_p95_ms": {"type": "number", "nullable": True},
            "spool_depth": {"type": "integer", "nullable": True},
            "pending_receipts": {"type": "integer", "nullable": True},
            "frames_dropped": {"type": "integer", "nullable": True},
            "results_dropped": {"type": "integer", "nullable": True},
            "cpu_percent": {"type": "number", "nullable": True},
            "temperature_c": {"type": "number", "nullable": True},
            "frames_rejected": {"type": "integer", "nullable": True},
            "source_error": {"type": "string", "description": "why a source is failing; empty when none is"},
            "metrics_at": NULLABLE_TIME,
            "status_at": NULLABLE_TIME,
            "provisioned": {"type": "boolean"},
            "url": {"type": "string"},
        },
    },
    "DeviceDetail": {
        "allOf": [
            _ref("Device"),
            {
                "type": "object",
                "properties": {
                    "activity": {
                        "type": "object",
                        "properties": {
                            "results_last_hour": {"type": "integer"},
                            "anomalies_last_hour": {"type": "integer"},
                            "results_last_day": {"type": "integer"},
                            "anomalies_last_day": {"type": "integer"},
                            "classes": {"type": "array", "items": {"type": "string"}},
                        },
                    }
                },
            },
        ]
    },
    "Crop": {
        "type": "object",
        "properties": {
            "idx": {"type": "integer"},
            "x": {"type": "integer"},
            "y": {"type": "integer"},
            "w": {"type": "integer"},
            "h": {"type": "integer"},
            "score": {"type": "number"},
            "image_url": URL,
        },
    },
    "Result": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "description": "ULID"},
            "ts": TIME,
            "received_at": TIME,
            "site": {"type": "string"},
            "device": {"type": "string"},
            "station": {"type": "string"},
            "cls": {"type": "string"},
            "model_version": {"type": "string"},
            "score": {"type": "number"},
            "norm_score": {"type": "number"},
            "threshold": {"type": "number"},
            "verdict": {"type": "string", "enum": list(VERDICTS)},
            "latency_ms": {"type": "number"},
            "source": {"type": "string"},
            "review": {"type": "string", "enum": list(REVIEW_LABELS), "nullable": True},
            "heatmap_url": URL,
            "thumbnail_url": URL,
            "frame_url": URL,
            "url": {"type": "string"},
            "crops": {"type": "array", "items": _ref("Crop")},
        },
    },
    "Review": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "result_id": {"type": "string"},
            "label": {"type": "string", "enum": list(REVIEW_LABELS)},
            "note": {"type": "string"},
            "created_at": TIME,
            "reviewer": {"type": "string", "nullable": True},
            "latest": {"type": "boolean", "description": "the result's latest review, the one that counts"},
            "site": {"type": "string"},
            "device": {"type": "string"},
            "station": {"type": "string"},
            "cls": {"type": "string"},
            "score": {"type": "number"},
            "threshold": {"type": "number"},
            "verdict": {"type": "string"},
            "ts": TIME,
            "heatmap_url": URL,
            "thumbnail_url": URL,
            "frame_url": URL,
            "image_url": {**URL, "description": "the full frame when kept, else the thumbnail"},
            "image_api_url": {**URL, "description": "the same image under /api/images/, for token clients"},
            "result_url": {"type": "string"},
        },
    },
    "NewReview": {
        "type": "object",
        "required": ["label"],
        "properties": {
            "label": {"type": "string", "enum": list(REVIEW_LABELS)},
            "note": {"type": "string", "maxLength": 2000},
        },
    },
    "Rollout": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "model": {"type": "string"},
            "version": {"type": "string"},
            "site": {"type": "string", "nullable": True},
            "state": {"type": "string"},
            "canary_devices": {"type": "integer"},
            "note": {"type": "string"},
            "created_at": TIME,
            "updated_at": TIME,
        },
    },
    "Model": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string"},
            "version": {"type": "string"},
            "method": {"type": "string"},
            "classes": {"type": "array", "items": {"type": "string"}},
            "precision": {"type": "string"},
            "sha256": {"type": "string"},
            "size_bytes": {"type": "integer"},
            "url": {"type": "string"},
            "notes": {"type": "string"},
            "created_at": TIME,
            "devices_running": {"type": "integer"},
            "rollouts": {"type": "array", "items": _ref("Rollout")},
            "parent_version": {"type": "string", "description": "the version it was retrained from"},
            "metrics": MODEL_METRICS,
        },
    },
    "NewModel": {
        "type": "object",
        "required": ["name", "version", "sha256", "size_bytes", "url"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "size_bytes": {"type": "integer", "minimum": 1},
            "url": {"type": "string"},
            "method": {"type": "string", "enum": list(METHODS)},
            "classes": {"type": "array", "items": {"type": "string"}},
            "precision": {"type": "string", "enum": list(PRECISIONS)},
            "notes": {"type": "string"},
            "parent_version": {"type": "string"},
            "metrics": MODEL_METRICS,
        },
    },
    "NewRollout": {
        "type": "object",
        "required": ["model_id"],
        "properties": {
            "model_id": {"type": "integer", "description": "registry id of the model to ship"},
            "site": {"type": "string", "description": "one site's devices only (default every site)"},
            "devices": {"type": "array", "items": {"type": "string"}, "description": "only these devices"},
            "canary": {
                "oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": "^[0-9.]+%$"}],
                "description": "devices that go first: a count or a percentage such as \"10%\" (default 1)",
            },
            "wave_size": {"type": "integer", "minimum": 0, "description": "devices per wave; 0: the rest at once"},
            "soak_s": {"type": "number", "minimum": 0, "description": "healthy seconds before the next wave (60)"},
            "max_failures": {"type": "integer", "minimum": 1, "description": "failed updates that stop it (1)"},
            "max_anomaly_rate": {"type": "number", "minimum": 0, "maximum": 1, "nullable": True,
                                 "description": "an updated device above this anomaly rate stops it"},
            "max_anomaly_rise": {"type": "number", "minimum": 0, "maximum": 1, "nullable": True,
                                 "description": "an updated device whose anomaly rate rose more than this "
                                                "(0.2: 20 points) above its rate on the model before stops it"},
            "max_latency_ms": {"type": "number", "minimum": 0, "nullable": True,
                               "description": "an updated device above this p95 latency stops it"},
            "wave_timeout_s": {"type": "number", "minimum": 0,
                               "description": "a told device that has not finished by then times out: a "
                                              "failure when online, left behind (told again on reconnect) "
                                              "when offline (1800)"},
            "queue": {"type": "boolean", "description": "when devices are busy in another rollout, wait "
                                                        "(state queued) and start once they are free (false)"},
            "note": {"type": "string"},
        },
        "additionalProperties": False,
    },
    "RolloutAction": {
        "type": "object",
        "properties": {"note": {"type": "string", "description": "why (shown on the dashboard)"}},
        "additionalProperties": False,
    },
    "RetrainCycle": {
        "type": "object",
        "required": ["cycle", "outcome"],
        "properties": {
            "id": {"type": "integer", "readOnly": True},
            "model_name": {"type": "string", "description": "the model the service retrains"},
            "cycle": {"type": "integer", "minimum": 0},
            "outcome": {"type": "string", "enum": ["waiting", "refused", "published", "failed"]},
            "reason": {"type": "string"},
            "new_images": {"type": "integer", "minimum": 0},
            "version": {"type": "string", "description": "the candidate's version, when published"},
            "model_id": {"type": "integer", "nullable": True},
            "rollout_id": {"type": "string", "nullable": True},
            "gate": {"type": "object", "description": "per-class AUROC of both models, false-alarm scores"},
            "created_at": TIME,
        },
    },
    "RolloutDetail": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "model_id": {"type": "integer"},
            "model": {"type": "string"},
            "version": {"type": "string"},
            "note": {"type": "string"},
            "state": {"type": "string", "enum": [s for s in ROLLOUT_STATES if s != ROLLOUT_DRAFT]},
            "url": {"type": "string", "description": "the rollout's dashboard page"},
            "policy": {"type": "object", "description": "canary, wave_size, soak_s, max_failures, "
                       "max_anomaly_rate, max_latency_ms, max_anomaly_rise, wave_timeout_s"},
            "targets": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "device": {"type": "string"},
                        "site": {"type": "string"},
                        "wave": {"type": "integer"},
                        "state": {"type": "string"},
                        "reason": {"type": "string"},
                        "previous": {"type": "string"},
                        "desired_at": NULLABLE_TIME,
                        "active_at": NULLABLE_TIME,
                        "updated_at": {**TIME, "description": "when the state last changed"},
                        "connection": {"type": "string", "enum": ["online", "silent", "offline"]},
                        "last_seen": NULLABLE_TIME,
                    },
                },
            },
            "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
            "created_at": TIME,
            "updated_at": TIME,
        },
    },
    "PackageUpload": {
        "type": "object",
        "required": ["package"],
        "properties": {
            "package": {"type": "string", "format": "binary", "description": "the .kdpkg file"},
            "notes": {"type": "string", "description": "only when registering (POST /api/models)"},
        },
    },
}


def _list(key: str, item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            key: {"type": "array", "items": _ref(item)},
            "next": {"type": "string", "nullable": True, "description": "the next page"},
        },
    }


PATHS: dict[str, Any] = {
    "/api/health": {
        "get": {
            "summary": "The hub and its database answer",
            "responses": {"200": _ok({"type": "object", "properties": {"status": {"type": "string"}}})}
            | ERRORS,
        }
    },
    "/api/openapi.json": {
        "get": {"summary": "This document", "responses": {"200": _ok({"type": "object"})} | ERRORS}
    },
    "/api/devices": {
        "get": {
            "summary": "Every device with its online state, model and health",
            "parameters": [_query("site", "one site only")],
            "responses": {"200": _ok(_list("devices", "Device"))} | ERRORS,
        }
    },
    "/api/devices/{site}/{name}": {
        "get": {
            "summary": "One device and what it produced in the last hour and day",
            "parameters": [_path("site", "site name"), _path("name", "device name")],
            "responses": {"200": _ok(_ref("DeviceDetail"))} | ERRORS | NOT_FOUND,
        }
    },
    "/api/results": {
        "get": {
            "summary": "Results, newest (or highest score) first, filtered",
            "parameters": RESULT_FILTERS,
            "responses": {"200": _ok(_list("results", "Result"))} | ERRORS,
        }
    },
    "/api/results/{result_id}": {
        "get": {
            "summary": "One result with its crops",
            "parameters": [_path("result_id", "the result's ULID")],
            "responses": {"200": _ok(_ref("Result"))} | ERRORS | NOT_FOUND,
        }
    },
    "/api/results/{result_id}/reviews": {
        "get": {
            "summary": "Every review of one result, newest first",
            "parameters": [_path("result_id", "the result's ULID")],
            "responses": {"200": _ok(_list("reviews", "Review"))} | ERRORS | NOT_FOUND,
        },
        "post": {
            "summary": "Review a result (operator role)",
            "parameters": [_path("result_id", "the result's ULID")],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("NewReview")}},
            },
            "responses": {"201": _ok(_ref("Review"), "Created")} | ERRORS | FORBIDDEN | NOT_FOUND,
        },
    },
    "/api/reviews": {
        "get": {
            "summary": "Reviews, newest first",
            "parameters": REVIEW_FILTERS,
            "responses": {"200": _ok(_list("reviews", "Review"))} | ERRORS,
        }
    },
    "/api/training-data": {
        "get": {
            "summary": "Results whose latest review has `label` (default false_alarm), with images: "
            "new normal training images for the trainer",
            "parameters": REVIEW_FILTERS,
            "responses": {"200": _ok(_list("items", "Review"))} | ERRORS,
        }
    },
    "/api/images/{sha}": {
        "get": {
            "summary": "An image (heat map, thumbnail, frame, crop) by its sha256, as /images/{sha} serves it to "
            "signed-in users; for token clients such as the trainer",
            "parameters": [_path("sha", "the image's sha256")],
            "responses": {
                "200": {
                    "description": "the image",
                    "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                                "image/png": {"schema": {"type": "string", "format": "binary"}}},
                },
            }
            | ERRORS
            | NOT_FOUND,
        }
    },
    "/api/models": {
        "get": {
            "summary": "The model registry, newest first",
            "parameters": [_query("name", "one model's versions only")],
            "responses": {"200": _ok(_list("models", "Model"))} | ERRORS,
        },
        "post": {
            "summary": "Register a model package (admin role): describe one hosted elsewhere (JSON), or "
            "upload the .kdpkg (multipart), which the hub verifies, registers from its manifest and hosts",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": _ref("NewModel")},
                    "multipart/form-data": {"schema": _ref("PackageUpload")},
                },
            },
            "responses": {"201": _ok(_ref("Model"), "Created")} | ERRORS | FORBIDDEN,
        },
    },
    "/api/models/{model_id}": {
        "get": {
            "summary": "One model with its rollouts",
            "parameters": [_path("model_id", "registry id", {"type": "integer"})],
            "responses": {"200": _ok(_ref("Model"))} | ERRORS | NOT_FOUND,
        }
    },
    "/api/models/{model_id}/package": {
        "get": {
            "summary": "Download the model's package; send `Range: bytes=N-` to resume (206 Partial Content, "
            "416 when N is past the end). The ETag and X-Package-Sha256 headers carry the file's sha256",
            "parameters": [_path("model_id", "registry id", {"type": "integer"})],
            "responses": {
                "200": {
                    "description": "the whole file",
                    "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
                },
                "206": {
                    "description": "the requested range (Content-Range says which)",
                    "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
                },
                "416": {"description": "the range starts past the end; Content-Range: bytes */SIZE"},
            }
            | ERRORS
            | NOT_FOUND,
        },
        "post": {
            "summary": "Upload the package of a model registered with JSON (admin role); it must verify and "
            "match the registered sha256 and size. Tampered or truncated files are refused (400)",
            "parameters": [_path("model_id", "registry id", {"type": "integer"})],
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {"schema": _ref("PackageUpload")},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "responses": {"200": _ok(_ref("Model"))} | ERRORS | FORBIDDEN | NOT_FOUND,
        },
    },
    "/api/retrain-cycles": {
        "get": {
            "summary": "The retraining service's latest cycles, newest first: outcome and reason",
            "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 200}}],
            "responses": {"200": _ok(_list("cycles", "RetrainCycle"))} | ERRORS,
        },
        "post": {
            "summary": "Report a cycle of `kdfleet trainer serve` (admin role)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("RetrainCycle")}}},
            "responses": {"201": _ok(_ref("RetrainCycle"), "Created")} | ERRORS | FORBIDDEN,
        },
    },
    "/api/rollouts": {
        "post": {
            "summary": "Start a rollout of a registry model (admin role), canary first, then in waves, as "
            "`kdfleet hub rollout start` does; `kdfleet hub serve` drives it. Devices already running the model "
            "are left out; 400 for an unknown key (the answer names the accepted ones), when no device is left, "
            "or when one is in another live rollout and `queue` is not true",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("NewRollout")}},
            },
            "responses": {"201": _ok(_ref("RolloutDetail"), "Created")} | ERRORS | FORBIDDEN | NOT_FOUND,
        }
    },
    "/api/rollouts/{rollout_id}": {
        "get": {
            "summary": "A rollout's status: state, note, policy, and each device's wave, update state and age, "
            "and connection",
            "parameters": [_path("rollout_id", "the rollout's id (a ULID)")],
            "responses": {"200": _ok(_ref("RolloutDetail"))} | ERRORS | NOT_FOUND,
        }
    },
    "/api/rollouts/{rollout_id}/{action}": {
        "post": {
            "summary": "Pause (no new wave starts), resume (devices still updating are told again) or abort "
            "(every device it touched is sent back) a rollout (admin role); 409 when its state does not allow it",
            "parameters": [
                _path("rollout_id", "the rollout's id (a ULID)"),
                _path("action", "what to do", {"type": "string", "enum": ["pause", "resume", "abort"]}),
            ],
            "requestBody": {
                "required": False,
                "content": {"application/json": {"schema": _ref("RolloutAction")}},
            },
            "responses": {
                "200": _ok(_ref("RolloutDetail")),
                "409": {"description": "the rollout's state does not allow this action; `detail` says why",
                        "content": {"application/json": {"schema": _ref("Error")}}},
            } | ERRORS | FORBIDDEN | NOT_FOUND,
        }
    },
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


def document(server_url: str) -> dict[str, Any]:
    """The OpenAPI 3.0 document, with this hub as its server."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "kdfleet hub API",
            "version": "1",
            "description": "Inspection results, devices, reviews and models of a kdfleet hub. "
            "Authenticate with a bearer token (`kdfleet hub add-token NAME --role "
            f"{'|'.join(ROLES)}`) or a dashboard session (then send the X-CSRF-Token header "
            f"with POSTs). Chart windows: {', '.join(WINDOWS)}.",
        },
        "servers": [{"url": server_url}],
        "security": [{"bearerAuth": []}, {"sessionCookie": []}],
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer"},
                "sessionCookie": {"type": "apiKey", "in": "cookie", "name": "kdfleet_session"},
            },
            "responses": {
                "BadRequest": _error("a parameter or body the hub cannot use; `detail` says which"),
                "Unauthorized": _error("no valid token or session"),
                "Forbidden": _error("the token's or user's role does not allow this"),
                "NotFound": _error("no such thing"),
            },
        },
    }
