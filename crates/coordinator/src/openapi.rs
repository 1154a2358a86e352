//! The OpenAPI description of the HTTP API, generated from the handlers' `#[utoipa::path]`
//! annotations and served at `/api/v1/openapi.json`. A test checks that every route of the
//! router ([`crate::server::routes`]) is described.

use axum::Json;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::{dashboard, http, metrics, ws};

#[derive(OpenApi)]
#[openapi(
    modifiers(&BearerTokens, &TargetLimit),
    info(
        title = "tether coordinator",
        description = "Tasks, workers and the fleet's health. Errors are `{\"error\": {\"code\", \"message\"}}`. The worker WebSocket protocol is described in docs/PROTOCOL.md."
    ),
    paths(
        ws::upgrade,
        http::submit,
        http::list_tasks,
        http::get_task,
        http::task_result,
        http::task_state,
        http::task_checkpoints,
        http::checkpoint_data,
        http::control,
        http::list_workers,
        http::get_worker,
        http::worker_action,
        http::list_runs,
        http::overview,
        http::history,
        dashboard::events::events,
        document,
        http::healthz,
        metrics::scrape,
        dashboard::index,
        dashboard::file,
    ),
    tags(
        (name = "tasks", description = "Submit, inspect and control tasks"),
        (name = "workers", description = "The fleet"),
        (name = "observe", description = "Overview, metrics, events, the dashboard"),
        (name = "protocol", description = "The worker endpoint (WebSocket)"),
    )
)]
pub struct ApiDoc;

/// Name of the bearer-token security scheme in the document.
pub const BEARER: &str = "bearer";

/// Marks every operation outside [`crate::auth::is_public`] as needing a bearer token (when the
/// coordinator has tokens), with its 401 and 403 (a narrower scope than it needs).
struct BearerTokens;

impl Modify for BearerTokens {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(
                "When the coordinator is started with tokens: a read token for GET, an admin token for everything else; a metrics token reads GET /metrics only. Without tokens it serves loopback only and asks for none.",
            ))
            .build();
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(BEARER, SecurityScheme::Http(scheme));
        for (path, item) in doc.paths.paths.iter_mut() {
            if crate::auth::is_public(path) {
                continue;
            }
            let ops = [
                (&mut item.get, false),
                (&mut item.post, true),
                (&mut item.put, true),
                (&mut item.delete, true),
                (&mut item.patch, true),
            ];
            for (op, write) in ops {
                let Some(op) = op.as_mut() else { continue };
                op.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
                let r = &mut op.responses.responses;
                r.entry("401".into())
                    .or_insert_with(|| error("No token, an unknown one, or an Authorization header that is not text (malformed)").into());
                if write {
                    r.entry("403".into()).or_insert_with(|| {
                        error("A read or metrics token on an admin request").into()
                    });
                } else if path != "/metrics" {
                    r.entry("403".into())
                        .or_insert_with(|| error("A metrics token on a read request").into());
                }
            }
        }
    }
}

/// An answer of the error body, saying `what`.
pub(crate) fn error(what: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(what)
        .content(
            "application/json",
            Content::new(Some(Ref::from_schema_name("ErrorBody"))),
        )
        .build()
}

/// Lists on every operation the `414 uri_too_long` of a request target over the API's limit
/// ([`http::target_limit`], outermost in the router; past hyper's bound, the admitted
/// connection's own answer): every path can be asked with one.
struct TargetLimit;

impl Modify for TargetLimit {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let what = format!(
            "`uri_too_long`: the request target (path and query) is over the {} bytes this coordinator reads",
            http::MAX_TARGET_BYTES
        );
        for item in doc.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                op.responses
                    .responses
                    .entry("414".into())
                    .or_insert_with(|| error(&what).into());
            }
        }
    }
}

/// The document, as a JSON value.
pub fn openapi_json() -> serde_json::Value {
    serde_json::to_value(ApiDoc::openapi()).unwrap_or_default()
}

/// This document.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "observe",
    responses((status = 200, description = "The OpenAPI description of this API", body = serde_json::Value))
)]
pub async fn document() -> Response {
    Json(openapi_json()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_of_the_router_is_described_with_its_methods() {
        let doc = openapi_json();
        let paths = doc["paths"].as_object().expect("paths");
        let routes = crate::server::routes();
        assert!(routes.len() >= 18, "the router has its routes: {routes:?}");
        for r in &routes {
            let Some(item) = paths.get(r.doc_path) else {
                panic!("route {} ({}) is not described", r.path, r.doc_path);
            };
            for m in r.methods {
                assert!(
                    item.get(*m).is_some(),
                    "{} {} is not described",
                    m.to_uppercase(),
                    r.doc_path
                );
            }
        }
        // And nothing is described that the router does not serve.
        for p in paths.keys() {
            assert!(
                routes.iter().any(|r| r.doc_path == p),
                "{p} is described but not routed"
            );
        }
    }

    #[test]
    fn operations_need_a_bearer_token_except_the_public_paths() {
        let doc = openapi_json();
        assert_eq!(
            doc["components"]["securitySchemes"][BEARER]["scheme"],
            "bearer"
        );
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("item") {
                let needs = op["security"][0].get(BEARER).is_some();
                assert_eq!(
                    needs,
                    !crate::auth::is_public(path),
                    "{method} {path}: security {}",
                    op["security"]
                );
                if needs {
                    assert!(
                        op["responses"]["401"].is_object(),
                        "{method} {path} has 401"
                    );
                }
            }
        }
    }

    /// What the handlers answer besides their success is listed: a path id that is not an id
    /// is a 422 (`parse_task`, a checkpoint or worker id), and everything that asks the core
    /// may be told it is stopping or out of space (503), as the dashboard's listing is.
    #[test]
    fn operations_list_the_422_of_their_ids_and_the_503_of_the_core() {
        let doc = openapi_json();
        let mut with_ids = 0;
        let mut of_the_core = 0;
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("item") {
                let responses = &op["responses"];
                if path.contains("{id}") || path.contains("{cid}") {
                    with_ids += 1;
                    assert!(
                        responses["422"].is_object(),
                        "{method} {path} lists the 422 of an id that is not one: {responses}"
                    );
                }
                // Every operation under these asks the core (a submission, when it has specs).
                let asks = [
                    "/api/v1/tasks",
                    "/api/v1/workers",
                    "/api/v1/runs",
                    "/api/v1/overview",
                ]
                .iter()
                .any(|p| path.starts_with(p));
                if asks {
                    of_the_core += 1;
                    let why = responses["503"]["description"].as_str().unwrap_or_default();
                    for code in ["shutting_down", "out_of_space"] {
                        assert!(
                            why.contains(code),
                            "{method} {path} lists the 503 {code}: {responses}"
                        );
                    }
                }
            }
        }
        assert_eq!(
            with_ids, 8,
            "every operation of a task, a checkpoint or a worker"
        );
        assert_eq!(
            of_the_core, 13,
            "every operation of tasks, workers, runs and the overview"
        );
    }

    /// Every operation lists the `414 uri_too_long` of a target over the limit, with the error
    /// body: the limit is the router's outermost layer, and every path can be asked with one.
    #[test]
    fn every_operation_lists_the_414_of_a_target_over_the_limit() {
        let doc = openapi_json();
        let mut ops = 0;
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("item") {
                ops += 1;
                let r = &op["responses"]["414"];
                assert_eq!(
                    r["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{method} {path}: {r}"
                );
                let said = r["description"].as_str().unwrap_or_default();
                assert!(said.contains("uri_too_long"), "{method} {path}: {said}");
            }
        }
        assert!(ops >= 18, "every operation: {ops}");
    }

    #[test]
    fn the_main_bodies_have_schemas_from_the_model() {
        let doc = openapi_json();
        let schemas = &doc["components"]["schemas"];
        for (name, field) in [
            ("Task", "status"),
            ("Task", "attempts"),
            ("Worker", "leases"),
            ("Worker", "resting"),
            ("Rest", "until"),
            ("Overview", "queued"),
            ("Sample", "reconnections"),
            ("ErrorBody", "error"),
            ("Submitted", "task_ids"),
            ("Submitted", "existing"),
        ] {
            assert!(
                schemas[name]["properties"][field].is_object(),
                "schema {name} has {field}: {}",
                schemas[name]
            );
        }
        let get_task = &doc["paths"]["/api/v1/tasks/{id}"]["get"]["responses"]["200"];
        assert_eq!(
            get_task["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/Task"
        );
    }

    /// A task id is an idempotency key: the submission's answers say so. 201 (something made)
    /// and 200 (all there already) carry the same body, whose `existing` lists the ids that
    /// were there, always present; another spec under a kept id is a 409.
    #[test]
    fn a_submission_s_answers_describe_existing_and_the_200_and_409_of_a_kept_id() {
        let doc = openapi_json();
        let answers = &doc["paths"]["/api/v1/tasks"]["post"]["responses"];
        for status in ["200", "201"] {
            assert_eq!(
                answers[status]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/Submitted",
                "{status}: {}",
                answers[status]
            );
            let said = answers[status]["description"].as_str().unwrap_or_default();
            assert!(
                said.contains("`existing`"),
                "{status} says what `existing` is: {said}"
            );
        }
        let conflict = answers["409"]["description"].as_str().unwrap_or_default();
        assert!(conflict.contains("different spec"), "{conflict}");
        let submitted = &doc["components"]["schemas"]["Submitted"];
        let existing = &submitted["properties"]["existing"];
        assert_eq!(existing["type"], "array", "{submitted}");
        assert_eq!(existing["items"]["type"], "string", "{submitted}");
        assert!(
            existing["description"]
                .as_str()
                .is_some_and(|d| d.contains("same spec")),
            "{submitted}"
        );
        let required = submitted["required"].as_array().expect("required fields");
        for field in ["task_ids", "existing"] {
            assert!(required.iter().any(|r| r == field), "{field}: {submitted}");
        }
    }

    #[test]
    fn the_document_is_openapi_3_with_responses_everywhere_and_errors_share_one_body() {
        let doc = openapi_json();
        assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with('3')));
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("item") {
                let responses = op["responses"].as_object();
                assert!(
                    responses.is_some_and(|r| !r.is_empty()),
                    "{method} {path} has responses"
                );
                for (status, r) in responses.into_iter().flatten() {
                    if status.starts_with('4') {
                        assert_eq!(
                            r["content"]["application/json"]["schema"]["$ref"],
                            "#/components/schemas/ErrorBody",
                            "{method} {path} {status} is described as an error body"
                        );
                    }
                }
            }
        }
    }
}
