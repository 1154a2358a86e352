//! A real coordinator's answers against the OpenAPI document it serves: each answer's status
//! is one the document lists for its operation, and its body fits that status's schema, every
//! field of it described (a field the document does not name is a failure here, as a client
//! generated from the document would not see it).

use serde_json::{Value, json};

use crate::support::coordinator;

/// The schema `s` names, through `$ref`s into the document's components.
fn resolve<'a>(doc: &'a Value, s: &'a Value) -> Result<&'a Value, String> {
    let mut s = s;
    // A chain of references is short; a loop of them is a broken document.
    for _ in 0..16 {
        let Some(r) = s.get("$ref").and_then(Value::as_str) else {
            return Ok(s);
        };
        let name = r
            .strip_prefix("#/components/schemas/")
            .ok_or_else(|| format!("a $ref outside the components: {r}"))?;
        s = doc["components"]["schemas"]
            .get(name)
            .ok_or_else(|| format!("{r} is not in the document"))?;
    }
    Err("a loop of $refs".into())
}

fn is_type(v: &Value, ty: &str) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    }
}

/// Whether `v` fits `schema` of `doc`, for the parts of JSON Schema the document uses
/// (`$ref`, `type`, `properties`, `required`, `items`, `enum`, `oneOf`, `anyOf`, `allOf`,
/// `additionalProperties`). An object's field the schema does not describe is refused unless
/// the schema allows others (`additionalProperties`). `at` names the place, for the message.
fn fits(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let s = resolve(doc, schema)?;
    if let Some(any) = s
        .get("oneOf")
        .or_else(|| s.get("anyOf"))
        .and_then(Value::as_array)
    {
        let tries: Vec<String> = any
            .iter()
            .filter_map(|alt| fits(doc, alt, v, at).err())
            .collect();
        if tries.len() == any.len() {
            return Err(format!("{at}: fits none of its alternatives: {tries:?}"));
        }
    }
    for part in s
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        fits(doc, part, v, at)?;
    }
    if let Some(ty) = s.get("type") {
        let types: Vec<&str> = match ty {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            other => return Err(format!("{at}: a type that is not one: {other}")),
        };
        if !types.iter().any(|t| is_type(v, t)) {
            return Err(format!("{at}: {v} is not of type {ty}"));
        }
    }
    if let Some(allowed) = s.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        return Err(format!("{at}: {v} is not one of {allowed:?}"));
    }
    if let Some(items) = s.get("items")
        && let Some(elements) = v.as_array()
    {
        for (i, e) in elements.iter().enumerate() {
            fits(doc, items, e, &format!("{at}[{i}]"))?;
        }
    }
    let described = s.get("properties").and_then(Value::as_object);
    if let (Some(obj), Some(fields)) = (v.as_object(), described) {
        for name in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = name.as_str().unwrap_or_default();
            if !obj.contains_key(name) {
                return Err(format!("{at}: required `{name}` is missing from {v}"));
            }
        }
        let others = s.get("additionalProperties");
        for (name, field) in obj {
            match fields.get(name) {
                Some(f) => fits(doc, f, field, &format!("{at}.{name}"))?,
                None => match others {
                    Some(Value::Bool(true)) => {}
                    Some(o @ Value::Object(_)) => fits(doc, o, field, &format!("{at}.{name}"))?,
                    _ => return Err(format!("{at}: `{name}` is not described ({v})")),
                },
            }
        }
    }
    Ok(())
}

/// Whether an answer of `status` with JSON `body` to `method path` (the document's path, with
/// its `{id}`s) is one the document describes.
fn described(
    doc: &Value,
    method: &str,
    path: &str,
    status: u16,
    body: &Value,
) -> Result<(), String> {
    let op = &doc["paths"][path][method];
    let answer = &op["responses"][status.to_string()];
    if !answer.is_object() {
        return Err(format!(
            "{method} {path}: {status} is not among its responses {:?}",
            op["responses"]
                .as_object()
                .map(|r| r.keys().collect::<Vec<_>>())
        ));
    }
    let schema = &answer["content"]["application/json"]["schema"];
    if schema.is_null() {
        return Err(format!(
            "{method} {path} {status}: no JSON body is described"
        ));
    }
    fits(doc, schema, body, &format!("{method} {path} {status}"))
}

/// Every answer of a submission (201 made, 200 there already, 409 another spec under the
/// id, and a batch of both kinds) is described by the served document: its status listed, its
/// body, `existing` among it, of the status's schema.
#[tokio::test]
async fn the_answers_of_a_submission_are_those_the_served_openapi_document_describes() {
    let (_dir, c) = coordinator().await;
    let client = c.client();
    let (status, doc) = client.get("/api/v1/openapi.json").await;
    assert_eq!(status, 200, "{doc}");
    let spec = json!({"task_id": "described-1", "kind": "sleep", "config": {"ms": 10}});
    let other = json!({"task_id": "described-1", "kind": "sleep", "config": {"ms": 20}});
    let batch = json!({"tasks": [spec, {"task_id": "described-2", "kind": "sleep"}]});
    let mut answers = Vec::new();
    for (what, body, want) in [
        ("new", &spec, 201),
        ("the same again", &spec, 200),
        ("another spec under the id", &other, 409),
        ("a batch of one there and one new", &batch, 201),
    ] {
        let (status, answer) = client.post("/api/v1/tasks", body).await;
        assert_eq!(status, want, "{what}: {answer}");
        if let Err(e) = described(&doc, "post", "/api/v1/tasks", status, &answer) {
            panic!("{what}: the answer is not as described: {e}");
        }
        answers.push(answer);
    }
    // What the statuses mean, so that the schemas were checked against the answers that
    // carry `existing`.
    assert_eq!(
        answers[1]["existing"],
        json!(["described-1"]),
        "{}",
        answers[1]
    );
    assert_eq!(
        answers[3]["existing"],
        json!(["described-1"]),
        "{}",
        answers[3]
    );
    assert_eq!(answers[0]["existing"], json!([]), "{}", answers[0]);

    // The check itself can fail: the same answers against the document without `existing`
    // in the answer's schema, or with the 200 not listed, are refused.
    let mut undescribed = doc.clone();
    let submitted = undescribed["paths"]["/api/v1/tasks"]["post"]["responses"]["200"]["content"]
        ["application/json"]["schema"]
        .clone();
    let name = submitted["$ref"]
        .as_str()
        .and_then(|r| r.rsplit('/').next())
        .expect("the 200 names its schema")
        .to_owned();
    let schema = &mut undescribed["components"]["schemas"][&name];
    schema["properties"]
        .as_object_mut()
        .expect("its properties")
        .remove("existing");
    if let Some(required) = schema["required"].as_array_mut() {
        required.retain(|r| r != "existing");
    }
    let e = described(&undescribed, "post", "/api/v1/tasks", 200, &answers[1])
        .expect_err("an answer with a field the document lacks");
    assert!(e.contains("`existing` is not described"), "{e}");
    let mut unlisted = doc.clone();
    unlisted["paths"]["/api/v1/tasks"]["post"]["responses"]
        .as_object_mut()
        .expect("responses")
        .remove("200");
    let e = described(&unlisted, "post", "/api/v1/tasks", 200, &answers[1])
        .expect_err("a status the document lacks");
    assert!(e.contains("200 is not among"), "{e}");
    c.stop().await;
}

/// The answers of the reading operations after a real run (a task completed by a worker) are
/// those the served document describes: a task, the listing, its result, the fleet, a
/// worker, the overview, the runs (and a limit refused), and a 404 of a task that is not
/// there.
#[tokio::test]
async fn the_answers_of_the_reading_operations_after_a_run_are_those_the_document_describes() {
    let (_dir, c) = coordinator().await;
    let w = crate::support::connected_worker(&c.ws_url(), "described-w").await;
    let client = c.client();
    let (_, doc) = client.get("/api/v1/openapi.json").await;
    let id = client
        .submit(&[tether_proto::TaskSpec {
            name: Some("described-run".into()),
            ..tether_testkit::sleep_task(10, 2, 1)
        }])
        .await
        .remove(0);
    client.wait_status(&id, "completed").await;
    let (_, runs) = client.get("/api/v1/runs").await;
    assert_eq!(runs[0]["name"], "described-run", "{runs}");
    assert_eq!(runs[0]["verdict"], "passed", "{runs}");
    for (path, asked) in [
        ("/api/v1/tasks/{id}", format!("/api/v1/tasks/{id}")),
        ("/api/v1/tasks", "/api/v1/tasks".to_owned()),
        (
            "/api/v1/tasks/{id}/result",
            format!("/api/v1/tasks/{id}/result"),
        ),
        ("/api/v1/workers", "/api/v1/workers".to_owned()),
        (
            "/api/v1/workers/{id}",
            "/api/v1/workers/described-w".to_owned(),
        ),
        ("/api/v1/overview", "/api/v1/overview".to_owned()),
        ("/api/v1/runs", "/api/v1/runs".to_owned()),
        ("/api/v1/runs", "/api/v1/runs?limit=1001".to_owned()),
        ("/api/v1/tasks/{id}", "/api/v1/tasks/not-there".to_owned()),
    ] {
        let (status, answer) = client.get(&asked).await;
        if let Err(e) = described(&doc, "get", path, status, &answer) {
            panic!("GET {asked}: the answer is not as described: {e}");
        }
    }
    w.stop().await.expect("clean stop");
    c.stop().await;
}

/// Sends `method target` as raw HTTP/1.1 over a real TCP connection (`Connection: close`; a
/// target this long no HTTP client builds) and reads the whole answer: its status, head and
/// body. A connection reset before the answer is read fails it.
async fn raw(addr: std::net::SocketAddr, method: &str, target: &str) -> (u16, String, String) {
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    crate::support::raw_http(addr, &request).await
}

/// A request target over the API's limit is answered `414 uri_too_long` with the error body
/// the served document describes, by every operation it lists; and so is one of 70,000 bytes,
/// past hyper's own bound (65,534), which hyper answered with a bare `414` and no body before
/// the coordinator's code saw it (the admitted connection now answers it, its head read to its
/// end first so the answer is not lost to a reset).
#[tokio::test]
async fn a_target_over_the_limit_is_answered_414_as_the_document_describes_by_every_operation_even_past_hypers_bound()
 {
    use tether_coordinator::http::MAX_TARGET_BYTES;
    let (_dir, c) = coordinator().await;
    let client = c.client();
    let (_, doc) = client.get("/api/v1/openapi.json").await;
    let mut asked = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        // Any id will do: the target's length is refused before its path is read.
        let concrete = path
            .split('/')
            .map(|part| if part.starts_with('{') { "x" } else { part })
            .collect::<Vec<_>>()
            .join("/");
        for method in item.as_object().expect("item").keys() {
            for len in [MAX_TARGET_BYTES + 1, 70_000] {
                let prefix = format!("{concrete}?pad=");
                let target = format!("{prefix}{}", "p".repeat(len - prefix.len()));
                let (status, head, body) = raw(c.addr, &method.to_uppercase(), &target).await;
                let at = format!("{method} {path} with a target of {len} bytes");
                assert_eq!(status, 414, "{at}: {head}\n{body}");
                let head = head.to_ascii_lowercase();
                assert!(
                    head.contains("content-type: application/json"),
                    "{at}: {head}"
                );
                let answer: Value = serde_json::from_str(&body)
                    .unwrap_or_else(|e| panic!("{at}: a JSON body ({e}): {body:?}"));
                if let Err(e) = described(&doc, method, path, status, &answer) {
                    panic!("{at}: the answer is not as described: {e}");
                }
                assert_eq!(answer["error"]["code"], "uri_too_long", "{at}: {body}");
                let said = answer["error"]["message"].as_str().unwrap_or_default();
                assert!(
                    said.contains(&format!("reads at most {MAX_TARGET_BYTES}")),
                    "{at}: {said}"
                );
                asked += 1;
            }
        }
    }
    assert!(asked >= 36, "every operation, both lengths: {asked}");
    let (status, _) = client.get("/healthz").await;
    assert_eq!(status, 200, "still serving");
    c.stop().await;
}
