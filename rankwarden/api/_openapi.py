"""The OpenAPI document, generated from the same Structs the handlers decode and encode."""

from __future__ import annotations

import functools

import msgspec

import rankwarden
from rankwarden.api._schema import (
    API_STATES,
    ErrorBody,
    Health,
    JobInfo,
    JobList,
    JobRequest,
    JobSummary,
    LogLines,
    PurgeRequest,
    PurgeResult,
    DeleteResult,
)
from rankwarden.api._dashboard import LoginRequest, LoginResult, TemplateInfo
from rankwarden.api._metrics_store import MetricsSeries
from rankwarden.spec import JOB_ID_PATTERN

__all__ = ["openapi_document"]


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_response(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    text = {400: "bad request", 401: "missing or wrong token", 403: "entrypoint or template not allowed; or a browser session without its X-Rankwarden header", 404: "no such job",
            409: "conflicts with the job's state", 413: "body too large", 503: "shutting down"}
    return {str(code): _json_response(text[code], _ref("ErrorBody")) for code in codes}


JOB_ID = {"name": "job_id", "in": "path", "required": True,
          "schema": {"type": "string", "pattern": JOB_ID_PATTERN, "maxLength": 63}}
SSE = {"description": "text/event-stream; `id` is the line number; send Last-Event-ID to resume",
       "content": {"text/event-stream": {"schema": {"type": "string"}}}}


@functools.lru_cache(maxsize=1)
def openapi_document() -> dict:
    (components,) = msgspec.json.schema_components(
        [JobRequest, JobInfo, JobList, JobSummary, LogLines, PurgeRequest, PurgeResult, DeleteResult, Health, ErrorBody,
         MetricsSeries, LoginRequest, LoginResult, TemplateInfo],
        ref_template="#/components/schemas/{name}",
    )[1:]
    job = {"parameters": [JOB_ID]}
    paths = {
        "/health": {"get": {"summary": "liveness", "security": [],
                            "responses": {"200": _json_response("ok", _ref("Health"))}}},
        "/jobs": {
            "post": {"summary": "submit a job",
                     "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("JobRequest")}}},
                     "responses": {"201": _json_response("created", _ref("JobInfo")), **_errors(400, 401, 403, 409, 413, 503)}},
            "get": {"summary": "list jobs",
                    "parameters": [
                        {"name": "state", "in": "query", "schema": {"type": "string"},
                         "description": f"comma-separated states: {', '.join(API_STATES)}"},
                        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
                    "responses": {"200": _json_response("jobs", _ref("JobList")), **_errors(400, 401)}},
        },
        "/jobs/summaries": {"get": {"summary": "summaries of active jobs", "responses": {
            "200": _json_response("summaries", {"type": "array", "items": _ref("JobSummary")}), **_errors(401)}}},
        "/jobs/purge": {"post": {"summary": "delete finished jobs, their logs and their checkpoints",
                                 "requestBody": {"content": {"application/json": {"schema": _ref("PurgeRequest")}}},
                                 "responses": {"200": _json_response("purged", _ref("PurgeResult")), **_errors(400, 401, 413)}}},
        "/jobs/{job_id}": {
            **job,
            "get": {"summary": "one job", "responses": {"200": _json_response("job", _ref("JobInfo")), **_errors(400, 401, 404)}},
            "delete": {"summary": "delete a finished job, its logs and its checkpoints (409 while it runs)",
                       "responses": {"200": _json_response("deleted", _ref("DeleteResult")),
                                     **_errors(400, 401, 404, 409)}},
        },
        "/jobs/{job_id}/summary": {**job, "get": {"summary": "progress, rates, ETA, failures, recovery, goodput",
                                                  "responses": {"200": _json_response("summary", _ref("JobSummary")), **_errors(400, 401, 404)}}},
        "/jobs/{job_id}/logs": {**job, "get": {"summary": "the last lines of rank output",
                                               "parameters": [
                                                   {"name": "lines", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100000}},
                                                   {"name": "rank", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 65535}},
                                                   {"name": "attempt", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000000}}],
                                               "responses": {"200": _json_response("lines", _ref("LogLines")), **_errors(400, 401, 404)}}},
        "/jobs/{job_id}/logs/stream": {**job, "get": {"summary": "rank output as Server-Sent Events",
                                                      "responses": {"200": SSE, **_errors(400, 401, 404)}}},
        "/jobs/{job_id}/events/stream": {**job, "get": {"summary": "lifecycle events as Server-Sent Events",
                                                        "responses": {"200": SSE, **_errors(400, 401, 404)}}},
        "/jobs/{job_id}/stop": {**job, "post": {"summary": "graceful stop: checkpoint, exit, then kill after a grace period",
                                                "responses": {"202": _json_response("stopping", _ref("JobInfo")), **_errors(400, 401, 404, 409)}}},
        "/jobs/{job_id}/metrics": {**job, "get": {
            "summary": "the job's reported metrics (rankwarden.worker.report), steps/s and samples/s as downsampled series",
            "parameters": [{"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 10**18},
                            "description": "only points with a sequence number above this"}],
            "responses": {"200": _json_response("series", _ref("MetricsSeries")), **_errors(400, 401, 404)}}},
        "/jobs/{job_id}/metrics/stream": {**job, "get": {
            "summary": "new metric points as Server-Sent Events (`point`; with summary=1 also a `summary` each second)",
            "parameters": [{"name": "summary", "in": "query", "schema": {"type": "string", "enum": ["0", "1"]}}],
            "responses": {"200": SSE, **_errors(400, 401, 404)}}},
        "/templates": {"get": {"summary": "the job templates this server offers (submit with template and params)",
                               "responses": {"200": _json_response("templates", {"type": "array", "items": _ref("TemplateInfo")}),
                                             **_errors(401)}}},
        "/login": {"post": {
            "summary": "browser login: exchange the token for an HttpOnly, SameSite=Strict session cookie "
                       "(needs the X-Rankwarden: 1 header)", "security": [],
            "parameters": [{"name": "X-Rankwarden", "in": "header", "required": True,
                            "schema": {"type": "string", "enum": ["1"]}}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("LoginRequest")}}},
            "responses": {"200": _json_response("logged in; the cookie is set", _ref("LoginResult")),
                          **_errors(400, 401, 403, 413)}}},
        "/logout": {"post": {"summary": "end the browser session (and clear its cookie)",
                             "responses": {"204": {"description": "logged out"}, **_errors(401, 403)}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
            "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
            **_errors(401)}}},
        "/openapi.json": {"get": {"summary": "this document", "responses": {
            "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}, **_errors(401)}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "rankwarden", "version": rankwarden.__version__},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
