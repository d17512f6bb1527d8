//! The OpenAPI 3.1 document of the management API, served at `<path>/openapi.json`.

use bytes::Bytes;

const DOCUMENT: &[u8] = include_bytes!("openapi.json");

/// The document as this gateway serves it: without `/signup` while sign-up is off, so
/// that it describes exactly what answers.
pub(super) fn document(signup_enabled: bool) -> Bytes {
    if signup_enabled {
        return Bytes::from_static(DOCUMENT);
    }
    let Ok(mut doc) = serde_json::from_slice::<serde_json::Value>(DOCUMENT) else {
        return Bytes::from_static(DOCUMENT);
    };
    if let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) {
        paths.remove("/signup");
    }
    serde_json::to_vec(&doc).map_or(Bytes::from_static(DOCUMENT), Bytes::from)
}

#[cfg(test)]
mod tests {
    use http::Method;
    use serde_json::Value;

    use super::DOCUMENT;
    use crate::management::call::Call;

    #[test]
    fn the_document_drops_signup_while_it_is_off() {
        let off: Value = serde_json::from_slice(&super::document(false)).expect("JSON");
        let on: Value = serde_json::from_slice(&super::document(true)).expect("JSON");
        assert!(off["paths"].get("/signup").is_none());
        assert!(on["paths"].get("/signup").is_some());
        assert_eq!(
            off["paths"].as_object().map(|p| p.len() + 1),
            on["paths"].as_object().map(|p| p.len())
        );
    }

    #[test]
    fn openapi_document_describes_exactly_the_served_api() {
        let doc: Value = serde_json::from_slice(DOCUMENT).expect("valid JSON");
        assert!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1"))
        );
        let mut documented: Vec<String> = doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .expect("path item")
                    .keys()
                    .filter(|k| ["get", "post", "put", "patch", "delete"].contains(&k.as_str()))
                    .map(move |method| format!("{} {path}", method.to_uppercase()))
            })
            .collect();
        documented.sort();
        let served = [
            "DELETE /keys/{id}",
            "GET /audit",
            "GET /authorize",
            "GET /authorize/{original}",
            "GET /keys",
            "GET /keys/{id}",
            "GET /openapi.json",
            "PATCH /keys/{id}",
            "POST /keys",
            "POST /keys/revoke",
            "POST /keys/verify",
            "POST /keys/{id}/quota/refill",
            "POST /keys/{id}/rotate",
            "POST /signup",
        ];
        assert_eq!(documented, served);
        // Each documented operation is routed (forward-auth decisions are the request
        // path's, in `gateway::forward_auth`).
        for entry in served.iter().filter(|e| !e.contains("/authorize")) {
            let (method, path) = entry.split_once(' ').expect("method and path");
            let method: Method = method.parse().expect("method");
            let path = path.replace("{id}", "01KEY");
            assert!(
                Call::parse(&path, &method, true).is_ok(),
                "{entry} is not routed"
            );
        }
    }
}
